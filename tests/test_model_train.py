import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from chest_ct.export import BYTES_SIGNATURE, PIXELS_SIGNATURE, export_saved_model, load_predictor, read_metadata
from chest_ct.ingest import build_dataset, split_files
from chest_ct.model import build_model, resolve_base_weights, split_model
from chest_ct.preprocess import decode_and_resize, to_model_input
from chest_ct.train import train
from tests.conftest import synthetic_image, write_dataset

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    root = write_dataset(tmp / "src", {"train": {"adenocarcinoma": 12, "normal": 12},
                                       "valid": {"adenocarcinoma": 4, "normal": 4},
                                       "test": {"adenocarcinoma": 4, "normal": 4}})
    build_dataset(root, tmp / "out")
    return tmp / "out"


@pytest.fixture(scope="module")
def trained(dataset):
    model = build_model(SIZE, "none")
    epochs_seen = []
    result = train(model, *split_files(dataset, "train"), *split_files(dataset, "valid"), epochs=3, batch_size=8,
                   augment_copies=1, seed=1, on_epoch=lambda e, logs: epochs_seen.append((e, logs)))
    return result, epochs_seen


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_saved_model(trained[0].model, tmp_path_factory.mktemp("sm") / "model", {"mlflow_run_id": "run-1"})


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


@pytest.mark.parametrize("value, message", [
    ("resnet", "expected 'imagenet'"),
    ("/no/such/weights.h5", "does not exist"),
])
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


def test_training_reports_every_epoch_and_learns(trained):
    result, seen = trained
    assert [e for e, _ in seen] == list(range(1, result.epochs_run + 1))
    assert {"loss", "val_loss", "val_auc", "accuracy"} <= set(seen[0][1])
    assert result.train_examples == 48  # 24 images, clean + 1 augmented copy
    assert result.class_weight == {0: 1.0, 1: 1.0}
    assert 1 <= result.best_epoch <= result.epochs_run
    assert result.history["loss"][-1] < result.history["loss"][0]


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs=0"), ({"batch_size": -1}, "batch_size=-1"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"), ({"augment_copies": 99}, "augment_copies=99"),
])
def test_bad_training_parameters(dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train(build_model(SIZE, "none"), *split_files(dataset, "train"), *split_files(dataset, "valid"), **kwargs)


def test_one_class_training_set_is_refused(dataset):
    files, labels = split_files(dataset, "train")
    only_normal = [f for f, y in zip(files, labels) if y == 0]
    with pytest.raises(ValueError, match="only class"):
        train(build_model(SIZE, "none"), only_normal, [0] * len(only_normal), *split_files(dataset, "valid"))


def test_saved_model_signatures_and_metadata(exported):
    loaded = tf.saved_model.load(str(exported))
    assert {BYTES_SIGNATURE, PIXELS_SIGNATURE} <= set(loaded.signatures)
    meta = read_metadata(exported)
    assert meta["class_names"] == ["normal", "adenocarcinoma"] and meta["positive_class"] == "adenocarcinoma"
    assert meta["image_size"] == SIZE and meta["threshold"] == 0.5 and meta["mlflow_run_id"] == "run-1"


def test_serving_graph_matches_training_preprocessing(trained, exported, dataset):
    """The bytes signature must give what the Keras model gives on training's own input pipeline."""
    files, _ = split_files(dataset, "test")
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


def test_fine_tuning_trains_only_the_last_block(dataset):
    model = build_model(SIZE, "none")
    base, _ = split_model(model)
    before = {w.path: w.numpy().copy() for w in base.weights}
    seen = []
    result = train(model, *split_files(dataset, "train"), *split_files(dataset, "valid"), epochs=1, batch_size=8,
                   fine_tune_epochs=1, fine_tune_learning_rate=1e-3, on_epoch=lambda e, logs: seen.append((e, logs)))
    changed = {path for path, value in before.items()
               if not np.array_equal(value, next(w for w in base.weights if w.path == path).numpy())}
    assert changed and all("block5" in path for path in changed), changed
    assert result.fine_tune_history["loss"] and seen[-1][0] == 2 and "ft_val_loss" in seen[-1][1]
    assert not base.trainable, "frozen again for export"


def test_failed_training_marks_the_mlflow_run_failed(dataset, tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    from chest_ct.train import train_and_export

    base_file = tmp_path / "base.keras"
    build_model(SIZE, "none").save(base_file)
    with pytest.raises(ValueError, match="epochs=0"):
        train_and_export(dataset, base_file, tmp_path / "out", epochs=0)
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("chest-ct").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["epochs"] == "0"
    assert not (tmp_path / "out").exists()
