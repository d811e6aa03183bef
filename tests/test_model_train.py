import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from chest_ct.determinism import seed_everything
from chest_ct.export import BYTES_SIGNATURE, PIXELS_SIGNATURE, export_saved_model, read_metadata
from chest_ct.fitting import Examples, fit_classifier, picture_weights
from chest_ct.ingest import build_dataset
from chest_ct.inputs import image_dataset
from chest_ct.model import build_model, resolve_base_weights, split_model
from chest_ct.ood import block_features, fit_guard
from chest_ct.precision import conv_policy
from chest_ct.predict import load_predictor
from chest_ct.preprocess import decode_and_resize, to_model_input
from chest_ct.records import TEST, TRAIN, VALID, Manifest
from tests.conftest import synthetic_image, write_dataset

SIZE = 32


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    root = write_dataset(
        tmp / "src",
        {
            "train": {"adenocarcinoma": 12, "normal": 12},
            "valid": {"adenocarcinoma": 4, "normal": 4},
            "test": {"adenocarcinoma": 4, "normal": 4},
        },
    )
    build_dataset(root, tmp / "out")
    return Manifest.load(tmp / "out")


def examples(manifest: Manifest, role: str) -> Examples:
    return Examples.of_role(manifest, role)


def fit(manifest: Manifest, seed: int = 1, **kwargs):
    seed_everything(seed)
    model = build_model(SIZE, "none")
    return fit_classifier(
        model,
        examples(manifest, TRAIN),
        examples(manifest, VALID),
        **{"epochs": 3, "batch_size": 8, "seed": seed, **kwargs},
    )


@pytest.fixture(scope="module")
def trained(manifest):
    epochs_seen = []
    result = fit(manifest, augment_copies=1, on_epoch=lambda e, logs: epochs_seen.append((e, logs)))
    return result, epochs_seen


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory, manifest):
    files, _ = manifest.files_and_labels(TRAIN)
    guard = fit_guard(block_features(trained[0].model, files, SIZE, 8), [r.group for r in manifest.role(TRAIN)])
    return export_saved_model(
        trained[0].model, tmp_path_factory.mktemp("sm") / "model", {"mlflow_run_id": "run-1"}, guard=guard
    )


def test_model_is_frozen_vgg16_with_new_head():
    model = build_model(SIZE, "none")
    base, head = split_model(model)
    assert base.name == "vgg16" and not base.trainable
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 1)
    assert [w.name for w in model.trainable_weights] == ["kernel", "bias"]
    assert head.output_shape == (None, 1)


def test_base_weights_from_local_h5(tmp_path):
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg")
    path = tmp_path / "vgg16_notop.weights.h5"
    donor.save_weights(path)
    base, _ = split_model(build_model(SIZE, str(path)))
    np.testing.assert_array_equal(base.get_weights()[0], donor.get_weights()[0])


@pytest.mark.parametrize(
    "value, message",
    [
        ("resnet", "expected 'imagenet'"),
        ("/no/such/weights.h5", "does not exist"),
    ],
)
def test_bad_base_weights(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_base_weights(value)


def test_wrong_h5_file_is_a_clear_error(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(ValueError, match="cannot load into VGG16"):
        build_model(SIZE, str(path))


@pytest.mark.parametrize("size", [16, 5000])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match=f"image_size={size}"):
        build_model(size, "none")


def test_the_seed_fixes_the_initial_weights():
    def weights(seed):
        seed_everything(seed)
        return build_model(SIZE, "none").get_weights()

    a, b, c = weights(5), weights(5), weights(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)


def test_picture_weights_count_each_picture_once():
    # Class 0: picture 1 has 3 copies, picture 2 one; class 1: pictures 3, 4, 5, 6.
    w = picture_weights([0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 2, 3, 4, 5, 6])
    assert w.mean() == pytest.approx(1.0)
    assert w[0] == pytest.approx(w[1]) and 3 * w[0] == pytest.approx(w[3]), "copies share one picture's weight"
    assert w[:4].sum() == pytest.approx(w[4:].sum()), "each class weighs the same"
    assert w[4] == pytest.approx(w[3] / 2), "two pictures per class 0, four per class 1"


def test_training_reports_every_epoch_and_learns(trained):
    result, seen = trained
    assert [e for e, _ in seen] == list(range(1, result.epochs_run + 1))
    assert {"loss", "val_loss", "val_auc", "accuracy"} <= set(seen[0][1])
    assert result.train_examples == 48  # 24 images, clean + 1 augmented copy
    assert 1 <= result.best_epoch <= result.epochs_run and result.exported_stage == "head"
    assert result.best_val_loss == min(result.history["val_loss"])
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.features.train.shape[0] == 24 and len(result.features.train_augmented) == 1


def test_one_pass_gives_the_head_its_features_and_the_guard_its_blocks(trained, manifest):
    """The guard is fitted on the blocks of fitting's own pass: they are what a separate pass would give."""
    result, _ = trained
    files = [*examples(manifest, TRAIN).files, *examples(manifest, VALID).files]
    assert [b.shape[0] for b in result.features.blocks] == [len(files)] * 5
    np.testing.assert_array_equal(
        result.features.blocks[-1].astype(np.float32), np.concatenate([result.features.train, result.features.valid])
    )
    base, _ = split_model(result.model)
    with conv_policy(base, result.precision.policy, result.model):  # the precision fitting ran in (auto: bf16 here)
        again = block_features(result.model, files, SIZE, 8)
    for ours, theirs in zip(result.features.blocks, again, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_same_seed_same_run(manifest, trained):
    """Initialisation, shuffling, dropout and augmentation all follow the seed: a rerun is identical on CPU."""
    first, _ = trained
    again = fit(manifest, augment_copies=1)
    assert again.history == first.history
    for x, y in zip(again.model.get_weights(), first.model.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(again.features.train_augmented[0], first.features.train_augmented[0])
    assert fit(manifest, seed=2, augment_copies=1).history != first.history


def test_augmentation_is_seeded_per_image_and_per_pass(manifest):
    files, labels = manifest.files_and_labels(TRAIN)

    def passes(seed):
        ds = image_dataset(files[:6], SIZE, 3, labels=labels[:6], augment_seed=seed)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    first, second = passes(7), passes(7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1]), "each pass (epoch) draws new augmentations"
    plain = np.concatenate([x.numpy() for x, _ in image_dataset(files[:6], SIZE, 3, labels=labels[:6])])
    assert not np.array_equal(first[0], plain) and first[0].shape == plain.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"augment_copies": 99}, "augment_copies=99"),
    ],
)
def test_bad_training_parameters(manifest, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_classifier(build_model(SIZE, "none"), examples(manifest, TRAIN), examples(manifest, VALID), **kwargs)


def test_one_class_training_set_is_refused(manifest):
    train = examples(manifest, TRAIN)
    idx = [i for i, y in enumerate(train.labels) if y == 0]
    only_normal = Examples([train.files[i] for i in idx], [0] * len(idx), [train.groups[i] for i in idx])
    with pytest.raises(ValueError, match="training labels hold only class"):
        fit_classifier(build_model(SIZE, "none"), only_normal, examples(manifest, VALID))


def test_saved_model_signatures_and_metadata(exported):
    loaded = tf.saved_model.load(str(exported))
    assert {BYTES_SIGNATURE, PIXELS_SIGNATURE} <= set(loaded.signatures)
    meta = read_metadata(exported)
    assert meta["class_names"] == ["normal", "adenocarcinoma"] and meta["positive_class"] == "adenocarcinoma"
    assert meta["image_size"] == SIZE and meta["threshold"] == 0.5 and meta["mlflow_run_id"] == "run-1"


def test_serving_graph_matches_training_preprocessing(trained, exported, manifest):
    """The bytes signature must give what the Keras model gives on training's own input pipeline."""
    files, _ = manifest.files_and_labels(TEST)
    encoded = [open(f, "rb").read() for f in files]
    from_graph = load_predictor(exported)(encoded)
    batch = tf.stack([decode_and_resize(tf.constant(b), SIZE) for b in encoded])
    from_keras = trained[0].model.predict(to_model_input(batch), verbose=0).reshape(-1)
    np.testing.assert_allclose(from_graph, from_keras, atol=1e-5)


def test_bytes_and_pixels_signatures_agree_for_any_mode(exported, tmp_path):
    loaded = tf.saved_model.load(str(exported))
    rgb = Image.open(__import__("io").BytesIO(synthetic_image("adenocarcinoma", 3, size=50))).convert("RGB")
    encoded = []
    for mode in ("RGB", "RGBA", "L"):
        path = tmp_path / f"x_{mode}.png"
        rgb.convert(mode).save(path)
        encoded.append(path.read_bytes())
    by_bytes = loaded.signatures[BYTES_SIGNATURE](images=tf.constant(encoded))["probability"].numpy()
    pixels = tf.constant(np.asarray(rgb, dtype=np.float32)[None])
    by_pixels = loaded.signatures[PIXELS_SIGNATURE](pixels=pixels)["probability"].numpy()
    np.testing.assert_allclose(by_bytes, np.repeat(by_pixels, 3), atol=1e-5)
    assert by_bytes.shape == (3,) and ((0 <= by_bytes) & (by_bytes <= 1)).all()


def test_fine_tuning_trains_only_the_last_block(manifest):
    seed_everything(1)
    model = build_model(SIZE, "none")
    base, _ = split_model(model)
    before = {w.path: w.numpy().copy() for w in base.weights}
    changed: set[str] = set()

    def on_epoch(epoch, logs):
        if "ft_val_loss" in logs:  # after a fine-tuning epoch, before any keep-or-discard decision
            changed.update(w.path for w in base.weights if not np.array_equal(before[w.path], w.numpy()))

    result = fit_classifier(
        model,
        examples(manifest, TRAIN),
        examples(manifest, VALID),
        epochs=1,
        batch_size=8,
        fine_tune_epochs=1,
        fine_tune_learning_rate=1e-3,
        on_epoch=on_epoch,
    )
    assert changed and all("block5" in path for path in changed), changed
    assert result.fine_tune_history["loss"] and not base.trainable, "frozen again for export"


def test_fine_tuning_that_does_not_help_is_discarded(manifest):
    head_only = fit(manifest)
    # A learning rate this large wrecks block5: validation loss gets worse, so the head-only model is exported.
    tuned = fit(manifest, fine_tune_epochs=2, fine_tune_learning_rate=1.0)
    assert min(tuned.fine_tune_history["val_loss"]) > head_only.best_val_loss
    assert tuned.exported_stage == "head"
    assert (tuned.best_epoch, tuned.best_val_loss) == (head_only.best_epoch, head_only.best_val_loss), (
        "the logged best epoch describes the exported model"
    )
    for x, y in zip(tuned.model.get_weights(), head_only.model.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_train_step_exports_threshold_and_fitted_images(manifest, tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    from chest_ct.train import train_and_export

    seed_everything(3)
    build_model(SIZE, "none").save(tmp_path / "base.keras")
    run_ids = [
        train_and_export(
            manifest.root,
            tmp_path / "base.keras",
            tmp_path / f"out{i}",
            epochs=2,
            batch_size=8,
            seed=3,
            threshold_folds=3,
            target_sensitivity=0.9,
        )
        for i in (1, 2)
    ]
    meta = read_metadata(tmp_path / "out1")
    assert meta["threshold_source"].startswith("out-of-fold: 3-fold grouped CV over 32 fitting images (32 pictures)")
    assert meta["training"]["exported_stage"] == "head" and meta["fitted_images"]["count"] == 32
    fitted = json.loads((tmp_path / "out1" / "fitted_images.json").read_text())["images"]
    assert {i["sha256"] for i in fitted} == {r.sha256 for r in manifest.records if r.split in (TRAIN, VALID)}
    assert {i["split"] for i in fitted} == {TRAIN, VALID}
    again = read_metadata(tmp_path / "out2")
    assert again["threshold"] == meta["threshold"] and again["training"] == meta["training"], "same seed, same run"
    client = MlflowClient()
    run = client.get_run(run_ids[0])
    assert run.data.metrics["threshold"] == pytest.approx(meta["threshold"])
    assert {"threshold_fold_spread", "oof_brier_per_image", "oof_ece_per_image", "best_epoch"} <= set(run.data.metrics)
    assert run.data.params["train_groups"] == "24" and run.data.tags["exported_stage"] == "head"
    artifacts = {a.path for a in client.list_artifacts(run_ids[0], "training")}
    assert {"training/fitted_images.json", "training/threshold.json", "training/history.json"} <= artifacts
    threshold = json.loads(open(client.download_artifacts(run_ids[0], "training/threshold.json")).read())
    assert threshold["folds"] == 3 and len(threshold["fold_thresholds"]) == 3 and "calibration" in threshold


def test_class_order_must_match_the_exported_names(tmp_path, presplit_dataset, mlflow_sqlite):
    from chest_ct.train import train_and_export

    build_dataset(presplit_dataset, tmp_path / "data", classes=("adenocarcinoma", "normal"))
    build_model(SIZE, "none").save(tmp_path / "base.keras")
    expected = r"dataset classes \['adenocarcinoma', 'normal'\] are not in the exported order"
    with pytest.raises(ValueError, match=expected):
        train_and_export(tmp_path / "data", tmp_path / "base.keras", tmp_path / "out")


def test_failed_training_marks_the_mlflow_run_failed(manifest, tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    from chest_ct.train import train_and_export

    base_file = tmp_path / "base.keras"
    build_model(SIZE, "none").save(base_file)
    with pytest.raises(ValueError, match="epochs=0"):
        train_and_export(manifest.root, base_file, tmp_path / "out", epochs=0)
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("chest-ct").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["epochs"] == "0"
    assert not (tmp_path / "out").exists()


def test_deterministic_turns_on_tensorflow_op_determinism():
    code = (
        "from chest_ct.determinism import seed_everything\n"
        "from tensorflow.python.framework import config\n"
        "before = config.is_op_determinism_enabled()\n"
        "seed_everything(1, deterministic=True)\n"
        "print(before, config.is_op_determinism_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]
