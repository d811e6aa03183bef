"""Training mirrored on several devices (chest_ct.devices.training_strategy) matches the single-device run.

No GPU here: the CPU is split into two logical devices, which must happen before
TensorFlow initialises, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import pytest

from tests.serving_helpers import run_in_subprocess

SETUP = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
from chest_ct.devices import training_strategy
from chest_ct.determinism import seed_everything
from chest_ct.fitting import Examples, fit_classifier
from chest_ct.ingest import build_dataset
from chest_ct.model import build_model
from chest_ct.records import TRAIN, VALID, Manifest
from tests.conftest import write_dataset

tmp = Path(PAYLOAD["tmp"])
root = write_dataset(tmp / "src", {"train": {"adenocarcinoma": 10, "normal": 10},
                                   "valid": {"adenocarcinoma": 4, "normal": 4},
                                   "test": {"adenocarcinoma": 4, "normal": 4}})
build_dataset(root, tmp / "data")
manifest = Manifest.load(tmp / "data")
train, valid = Examples.of_role(manifest, TRAIN), Examples.of_role(manifest, VALID)
mirrored = training_strategy(["/cpu:0", "/cpu:1"])
RESULT["replicas"] = [tf.distribute.get_strategy().num_replicas_in_sync, mirrored.num_replicas_in_sync,
                      training_strategy().num_replicas_in_sync]
"""

FIT = (
    SETUP
    + """
# Fine-tuning reads images through tf.data with per-epoch augmentation and shuffling. Keras' distributed input
# path iterates that dataset differently, so the two runs would see different (seeded) draws; without them the
# comparison is of the arithmetic alone. The draws themselves run mirrored in the train-step test below.
import chest_ct.fitting as fitting
_dataset = fitting.image_dataset
fitting.image_dataset = lambda files, size, batch, **kw: _dataset(files, size, batch,
                                                                 **{**kw, "augment_seed": None, "shuffle_seed": None})

def run(strategy):
    seed_everything(7)
    with strategy.scope():
        model = build_model(32, "none", dropout=0.0)  # no dropout draws: replicas may only reorder sums
        result = fit_classifier(model, train, valid, epochs=3, batch_size=8, fine_tune_epochs=1,
                                fine_tune_learning_rate=1e-4, augment_copies=1, precision="fp32")
    return result

one, two = run(tf.distribute.get_strategy()), run(mirrored)
RESULT["variable"] = type(two.model.weights[0].value).__name__
for name in ("train", "valid"):
    a, b = getattr(one.features, name), getattr(two.features, name)
    RESULT[f"{name}_feature_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
a, b = one.features.train_augmented[0], two.features.train_augmented[0]
RESULT["augmented_feature_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
RESULT["val_loss"] = [one.history["val_loss"], two.history["val_loss"]]
RESULT["ft_val_loss"] = [one.fine_tune_history["val_loss"], two.fine_tune_history["val_loss"]]
from chest_ct.inputs import image_dataset
x = np.concatenate([b for b in image_dataset(valid.files, 32, 8)])
RESULT["stages"] = [one.exported_stage, two.exported_stage]
RESULT["prob_diff"] = float(np.abs(one.model.predict(x, verbose=0) - two.model.predict(x, verbose=0)).max())
"""
)

TRAIN_STEP = (
    SETUP
    + """
import os
import mlflow
import chest_ct.train as train_module
from chest_ct.export import read_metadata
from chest_ct.predict import load_predictor
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
mlflow.create_experiment("chest-ct", artifact_location=(tmp / "artifacts").as_uri())
seed_everything(3)
build_model(32, "none").save(tmp / "base.keras")
train_module.training_strategy = lambda: mirrored  # what two visible GPUs would give
run_id = train_module.train_and_export(tmp / "data", tmp / "base.keras", tmp / "out", epochs=2, batch_size=8,
                                       seed=3, threshold_folds=3, target_sensitivity=0.9, augment_copies=1,
                                       fine_tune_epochs=1, precision="fp32")
run = mlflow.get_run(run_id)
RESULT["replicas_param"] = run.data.params["replicas"]
RESULT["ft_epochs"] = len([m for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_ft_val_loss")])
meta = read_metadata(tmp / "out")
RESULT["threshold"] = meta["threshold"]
guard = meta["precision_guard"]
images = [(tmp / "out" / n).read_bytes() for n in guard["golden_images"]]
RESULT["golden_diff"] = float(np.abs(load_predictor(tmp / "out")(images) - guard["fp32_probabilities"]).max())
"""
)


@pytest.mark.slow
def test_mirrored_feature_pass_head_and_fine_tuning_match_one_device(tmp_path):
    result = run_in_subprocess(FIT, {"tmp": str(tmp_path)}, timeout=600)
    assert result["replicas"] == [1, 2, 1], "two logical CPUs mirrored; no GPU here, so the default is one device"
    assert result["variable"] == "MirroredVariable"
    # The frozen base's features do not depend on how a batch is split.
    assert max(result[f"{k}_feature_rel_diff"] for k in ("train", "valid", "augmented")) < 1e-5, result
    # Without dropout, replicas change only the order of sums: the head, fine-tuning and the model agree.
    assert result["stages"] == ["fine-tuned", "fine-tuned"]
    for single, mirrored in (result["val_loss"], result["ft_val_loss"]):
        assert len(single) == len(mirrored)
        assert max(abs(s - m) for s, m in zip(single, mirrored, strict=True)) < 1e-4, result
    assert result["prob_diff"] < 1e-4, result


@pytest.mark.slow
def test_the_train_step_runs_mirrored_end_to_end(tmp_path):
    result = run_in_subprocess(TRAIN_STEP, {"tmp": str(tmp_path)}, timeout=600)
    assert result["replicas_param"] == "2" and result["ft_epochs"] == 1, result
    assert 0 <= result["threshold"] <= 1
    assert result["golden_diff"] == 0.0, "the exported model answers as its golden set says"
