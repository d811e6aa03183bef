"""The out-of-distribution guard: fitted and calibrated, inside every signature, and its rates.

Synthetic CT-like slices (tests/serving_helpers.ct_like) stand for the training
distribution; the foreign set (chest_ct.foreign) is the one evaluation uses. On the
shared real data the accept rate is measured on pictures the guard never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from chest_ct.export import SIGNATURES, export_saved_model, read_metadata
from chest_ct.foreign import foreign_set
from chest_ct.guard_eval import guard_markdown, guard_rates, log_guard_rates
from chest_ct.model import build_model, split_model
from chest_ct.ood import BLOCKS, GuardGraph, block_features, feature_model, fit_guard
from chest_ct.predict import predict_outputs
from chest_ct.preprocess import resize, to_model_input
from chest_ct.window import Window
from serving.dicom import read_hu
from tests.conftest import SHARED_DATA
from tests.dicom_helpers import TEST_MAX_PIXELS, ct_dicom
from tests.serving_helpers import ct_like, encode, lung_window

SIZE = 32


# --- fitting and calibration --------------------------------------------------------------------


def _gaussian_blocks(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[np.ndarray]:
    """Non-negative 'pooled features' for three blocks (as ReLU averages are)."""
    return [np.abs(rng.normal(1.0 + shift, 0.3, (n, d))) for d in (4, 8, 16)]


def test_guard_is_calibrated_out_of_fold_and_refuses_what_is_far():
    rng = np.random.default_rng(0)
    train, fresh, far = _gaussian_blocks(rng, 300), _gaussian_blocks(rng, 2000), _gaussian_blocks(rng, 50, 2.0)
    guard = fit_guard(train, np.arange(300) // 2, quantile=0.95)  # pairs of copies: folds keep them together
    assert guard.calibration["folds"] == 5 and guard.calibration["pictures"] == 150
    assert guard.calibration["out_of_fold_accepted"] >= 0.95
    accepted = np.mean(guard.score(fresh) <= guard.threshold)
    assert 0.9 <= accepted <= 0.995, accepted  # ~the quantile on new images of the same distribution
    assert np.all(guard.score(far) > guard.threshold)
    in_sample = np.mean(guard.score(train) <= guard.threshold)
    assert in_sample >= accepted, "fitted images sit closer than new ones: why calibration is out-of-fold"


def test_guard_needs_two_pictures_and_a_sensible_quantile():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="at least 2 distinct pictures"):
        fit_guard(_gaussian_blocks(rng, 10), [7] * 10)
    for bad in (0.2, 1.5, True):
        with pytest.raises(ValueError, match="ood_quantile="):
            fit_guard(_gaussian_blocks(rng, 10), range(10), quantile=bad)


def test_the_graph_computes_what_numpy_computes():
    rng = np.random.default_rng(2)
    guard = fit_guard(_gaussian_blocks(rng, 60), range(60))
    probe = _gaussian_blocks(rng, 20, 0.5)
    out = GuardGraph(guard)([tf.constant(f, tf.float32) for f in probe])
    np.testing.assert_allclose(out["ood_score"].numpy(), guard.score(probe), rtol=1e-4)
    np.testing.assert_array_equal(out["in_distribution"].numpy(), out["ood_score"].numpy() <= guard.threshold)


# --- the guard inside the SavedModel ------------------------------------------------------------


def _ct_files(folder: Path, seeds: range) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in seeds:
        files.append(str(folder / f"{seed}.png"))
        Path(files[-1]).write_bytes(encode(lung_window(ct_like(seed, size=48 + seed % 3 * 16, nodule=seed % 2 == 0))))
    return files


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A random-weight model whose guard is fitted on 80 CT-like slices; 40 more are its test images."""
    import keras

    tmp = tmp_path_factory.mktemp("guarded")
    keras.utils.set_random_seed(3)
    model = build_model(SIZE, "none")
    fitting = _ct_files(tmp / "fit", range(80))
    guard = fit_guard(block_features(model, fitting, SIZE, 16), list(range(80)))
    window = Window(level=-650, width=1400)
    model_dir = export_saved_model(model, tmp / "model", {"mlflow_run_id": "ood-test"}, guard=guard, window=window)
    return model, guard, model_dir, _ct_files(tmp / "test", range(100, 140)), tmp


def test_the_features_are_one_pass_of_the_base_and_its_last_output_is_the_heads_input(guarded):
    model, *_ = guarded
    x = to_model_input(resize(tf.constant(lung_window(ct_like(5))[None, ..., None].repeat(3, -1)), SIZE))
    pooled = feature_model(model)(x)
    assert len(pooled) == len(BLOCKS) == 5
    assert [int(p.shape[-1]) for p in pooled] == [64, 128, 256, 512, 512]
    base, head = split_model(model)
    np.testing.assert_allclose(pooled[-1].numpy(), base(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(head(pooled[-1]).numpy(), model(x).numpy(), atol=1e-6)


def test_every_signature_returns_the_guards_outputs_and_the_metadata_its_threshold(guarded):
    _, guard, model_dir, test_files, _ = guarded
    loaded = tf.saved_model.load(str(model_dir))
    assert set(SIGNATURES.values()) <= set(loaded.signatures)
    for name in SIGNATURES.values():
        outputs = loaded.signatures[name].structured_outputs
        assert outputs["ood_score"].dtype == tf.float32 and outputs["in_distribution"].dtype == tf.bool, name
    meta = read_metadata(model_dir)
    assert meta["ood"]["threshold"] == pytest.approx(guard.threshold) and meta["ood"]["quantile"] == 0.99
    assert meta["ood"]["blocks"] == list(BLOCKS)
    assert meta["window"] == {"level": -650.0, "width": 1400.0}
    png = Path(test_files[0]).read_bytes()
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)[None]
    by_bytes = loaded.signatures["serving_default"](images=tf.constant([png]))
    by_pixels = loaded.signatures["serve_pixels"](pixels=tf.constant(pixels))
    assert abs(float(by_bytes["ood_score"][0]) - float(by_pixels["ood_score"][0])) <= 1e-4


def test_dicom_slices_are_scored_through_serve_hu_with_the_exported_window(guarded):
    model, _, model_dir, _, tmp = guarded
    hu = ct_like(300, size=64, nodule=True)
    path = tmp / "IM0300"
    path.write_bytes(ct_dicom(hu))
    out = predict_outputs(model_dir, [str(path)])
    # The Keras model on training's own reading of the same file, through the same window.
    from chest_ct.inputs import image_dataset

    from_training = model.predict(
        image_dataset([str(path)], SIZE, 1, window=Window(level=-650, width=1400)), verbose=0
    ).reshape(-1)
    assert abs(float(out["probability"][0]) - float(from_training[0])) <= 1e-5
    assert bool(out["in_distribution"][0]), "a CT slice read from DICOM looks like the lung-window PNGs"
    np.testing.assert_array_equal(read_hu(path.read_bytes(), TEST_MAX_PIXELS), np.round(hu))


def test_rates_on_synthetic_data_meet_both_targets(guarded):
    _, _, model_dir, test_files, _ = guarded
    rates = guard_rates(model_dir, test_files)
    assert rates.test_images == 40 and rates.foreign_images == len(foreign_set(test_files))
    assert set(rates.per_category) == {
        "natural photo",
        "noise",
        "solid colour",
        "gradient",
        "text",
        "CT in bone window",
        "CT upside down",
        "CT inverted",
    }
    print(json.dumps(rates.to_dict(), indent=1))
    assert rates.test_accept_rate >= 0.95, rates.to_dict()
    assert rates.foreign_reject_rate >= 0.95, rates.to_dict()
    report = rates.to_dict()
    assert report["meets_accept_target"] and report["meets_reject_target"]
    assert "foreign images rejected" in "\n".join(guard_markdown(report))


def test_rates_are_logged_to_mlflow(guarded, mlflow_sqlite):
    import mlflow

    _, _, model_dir, test_files, _ = guarded
    rates = guard_rates(model_dir, test_files[:4])
    mlflow.set_experiment("chest-ct")
    with mlflow.start_run() as run:
        pass
    log_guard_rates(run.info.run_id, rates)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["guard_test_accept_rate"] == pytest.approx(rates.test_accept_rate)
    assert logged["guard_foreign_reject_rate"] == pytest.approx(rates.foreign_reject_rate)
    assert logged["guard_reject_rate_natural_photo"] == pytest.approx(
        rates.per_category["natural photo"]["reject_rate"]
    )


# --- the shared real data -----------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.skipif(
    not (SHARED_DATA / "train").is_dir(),
    reason=f"real data not found at {SHARED_DATA} (it lives in ../shared beside the checkout)",
)
def test_real_ct_pictures_the_guard_never_saw_are_accepted(tmp_path):
    """Nested by picture: the guard is fitted and calibrated on 4/5 of the pictures, the rest are scored.

    Every one of the 258 real images is scored by a guard that never saw its picture,
    so the rate rests on 258 images rather than the 10 of the test role.
    """
    import keras
    from sklearn.model_selection import GroupKFold

    from chest_ct.ingest import build_dataset
    from chest_ct.records import Manifest

    build_dataset(SHARED_DATA, tmp_path / "ds")
    manifest = Manifest.load(tmp_path / "ds")
    records = [r for r in manifest.records if r.split != "excluded"]
    groups = np.array([r.group for r in records])
    keras.utils.set_random_seed(1)
    model = build_model(SIZE, "none")
    features = block_features(model, [manifest.file(r) for r in records], SIZE, 32)
    accepted = np.zeros(len(records), bool)
    for fit_idx, held_idx in GroupKFold(5).split(features[0], groups=groups):
        guard = fit_guard([f[fit_idx] for f in features], groups[fit_idx])
        accepted[held_idx] = guard.score([f[held_idx] for f in features]) <= guard.threshold
    labels = np.array([r.label for r in records])
    by_class = {label: float(accepted[labels == label].mean()) for label in manifest.classes}
    print(f"real pictures accepted: {accepted.mean():.3f} of {len(records)}; by class {by_class}")
    assert accepted.mean() >= 0.95, by_class


def test_a_champion_exported_before_the_guard_still_scores_images(tmp_path, guarded):
    """Evaluate compares with the current champion, which may predate DICOM and the guard."""
    _, _, _, test_files, _ = guarded

    class Old(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def images(self, images):
            return {"probability": tf.fill(tf.shape(images), 0.25)}

    old = Old()
    tf.saved_model.save(old, str(tmp_path / "old"), signatures={"serving_default": old.images})
    out = predict_outputs(tmp_path / "old", test_files[:3])
    assert set(out) == {"probability"} and out["probability"].tolist() == [0.25] * 3
    (tmp_path / "IM1").write_bytes(ct_dicom(ct_like(1)))
    with pytest.raises(ValueError, match="has no 'serve_hu' signature .* cannot score DICOM files"):
        predict_outputs(tmp_path / "old", [str(tmp_path / "IM1")])
