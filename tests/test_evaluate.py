import json
import math

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from chest_ct.evaluate import Floors, blessing_decision, evaluate
from chest_ct.export import export_saved_model, load_predictor, read_metadata
from chest_ct.ingest import build_dataset, split_files
from chest_ct.metrics import choose_threshold, classification_metrics
from chest_ct.model import build_model, split_model
from chest_ct.shortcut import shortcut_audit
from chest_ct.train import train
from tests.conftest import write_dataset

Y = [0, 0, 1, 1, 1, 1]
P = [0.1, 0.4, 0.35, 0.8, 0.9, 0.95]


def test_threshold_is_the_highest_that_reaches_the_target():
    assert choose_threshold(Y, P, 0.75) == pytest.approx(0.8)
    assert choose_threshold(Y, P, 1.0) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="target_sensitivity=1.5"):
        choose_threshold(Y, P, 1.5)


def test_classification_metrics_by_hand():
    m = classification_metrics(Y, P, 0.38)  # predicted positive: .4 .8 .9 .95 -> tp 3, fp 1, fn 1, tn 1
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(0.75) and m["roc_auc"] == pytest.approx(7 / 8)
    expected_loss = -np.mean([math.log(0.9), math.log(0.6), math.log(0.35), math.log(0.8), math.log(0.9), math.log(0.95)])
    assert m["loss"] == pytest.approx(expected_loss)


def stats_records(n: int, rng, brightness_by_label: bool) -> list[dict]:
    out = []
    for i in range(n):
        label = "adenocarcinoma" if i % 2 else "normal"
        bright = (150 if label == "adenocarcinoma" else 60) if brightness_by_label else 100
        out.append({"label": label, "brightness_mean": bright + rng.normal(0, 5), "brightness_std": rng.normal(40, 5),
                    "width": 512, "height": 512, "format": "PNG"})
    return out


def test_shortcut_audit_warns_when_statistics_predict_the_label():
    rng = np.random.default_rng(0)
    audit = shortcut_audit(stats_records(40, rng, True), stats_records(20, rng, True), "adenocarcinoma", 0.97)
    assert audit["warning"] and audit["statistics_auc"] > 0.95
    assert audit["message"].startswith("SHORTCUT WARNING") and audit["single_feature_auc"]["brightness_mean"] > 0.95


def test_shortcut_audit_is_quiet_when_statistics_are_uninformative():
    rng = np.random.default_rng(0)
    audit = shortcut_audit(stats_records(40, rng, False), stats_records(40, rng, False), "adenocarcinoma", 0.97)
    assert not audit["warning"] and audit["statistics_auc"] < 0.8


def test_blessing_decision():
    good = {"roc_auc": 0.9, "sensitivity": 0.95, "specificity": 0.7}
    assert blessing_decision(good, Floors(), None, 0.01) == (True, [])
    ok, reasons = blessing_decision({**good, "specificity": 0.4}, Floors(), None, 0.01)
    assert not ok and reasons == ["specificity 0.4000 is below the floor 0.5000"]
    ok, reasons = blessing_decision(good, Floors(), {"roc_auc": 0.95}, 0.01)
    assert not ok and "regresses against the champion's 0.9500" in reasons[0]
    assert blessing_decision(good, Floors(), {"roc_auc": 0.905}, 0.01)[0], "within the allowed drop"
    with pytest.raises(ValueError, match="min_roc_auc=1.5"):
        Floors(roc_auc=1.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained model and its mirror image (1 - p): one is strictly better on the test split."""
    tmp = tmp_path_factory.mktemp("eval")
    root = write_dataset(tmp / "src", {"train": {"adenocarcinoma": 10, "normal": 10},
                                       "valid": {"adenocarcinoma": 4, "normal": 4},
                                       "test": {"adenocarcinoma": 5, "normal": 5}})
    build_dataset(root, tmp / "data")
    model = build_model(32, "none")
    train(model, *split_files(tmp / "data", "train"), *split_files(tmp / "data", "valid"), epochs=2, batch_size=8,
          augment_copies=0)
    a = export_saved_model(model, tmp / "a", {})
    _, head = split_model(model)
    kernel, bias = head.get_weights()
    head.set_weights([-kernel, -bias])
    b = export_saved_model(model, tmp / "b", {})
    files, y = split_files(tmp / "data", "test")
    encoded = [open(f, "rb").read() for f in files]
    from sklearn.metrics import roc_auc_score

    auc_a = roc_auc_score(y, load_predictor(a)(encoded))
    assert auc_a != 0.5
    better, worse = (a, b) if auc_a > 0.5 else (b, a)
    return tmp / "data", better, worse


def new_run() -> str:
    mlflow.set_experiment("chest-ct")
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


NO_FLOORS = Floors(roc_auc=0.0, sensitivity=0.0, specificity=0.0)


def test_evaluate_registers_blesses_and_refuses_a_regression(models, tmp_path, mlflow_sqlite):
    data, better, worse = models
    run1 = new_run()
    first = evaluate(better, data, tmp_path / "m1", tmp_path / "p1", run_id=run1, floors=NO_FLOORS,
                     target_sensitivity=0.8)
    assert first.blessed and first.reasons == [] and first.model_version == "1"
    client = MlflowClient()
    assert client.get_model_version_by_alias("chest-ct", "champion").version == 1
    assert client.get_model_version_by_alias("chest-ct", "candidate").version == 1
    meta = read_metadata(tmp_path / "m1")
    assert meta["threshold"] == pytest.approx(first.threshold) and meta["mlflow_run_id"] == run1
    assert first.valid_sensitivity >= 0.8, "the threshold reaches the target where it was chosen"
    assert "on the 'valid' split" in meta["threshold_source"]
    run = client.get_run(run1)
    assert run.data.metrics["valid_sensitivity_at_threshold"] == pytest.approx(first.valid_sensitivity)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(first.metrics["roc_auc"])
    assert run.data.tags["blessed"] == "true" and run.data.tags["shortcut_warning"] in {"true", "false"}
    artifacts = {a.path for a in client.list_artifacts(run1, "plots")}
    assert artifacts == {"plots/confusion_matrix.png", "plots/roc_curve.png"}
    assert (tmp_path / "p1" / "roc_curve.png").stat().st_size > 1000
    assert "saved_model/model_metadata.json" in {a.path for a in client.list_artifacts(run1, "saved_model")}

    run2 = new_run()
    second = evaluate(worse, data, tmp_path / "m2", tmp_path / "p2", run_id=run2, floors=NO_FLOORS)
    assert not second.blessed and "regresses against the champion" in second.reasons[0]
    assert client.get_model_version_by_alias("chest-ct", "champion").version == 1
    assert client.get_model_version_by_alias("chest-ct", "candidate").version == 2
    assert client.get_run(run2).data.tags["blessed"] == "false"


def test_floors_and_broken_champion_block_blessing(models, tmp_path, mlflow_sqlite):
    data, better, _ = models
    strict = evaluate(better, data, tmp_path / "m1", tmp_path / "p1", run_id=new_run(),
                      floors=Floors(roc_auc=1.0, sensitivity=1.0, specificity=1.0), target_sensitivity=0.5)
    assert not strict.blessed and any("below the floor" in r for r in strict.reasons)
    client = MlflowClient()
    bogus = client.create_model_version("chest-ct", source="file:///no/such/model", run_id=None)
    client.set_registered_model_alias("chest-ct", "champion", bogus.version)
    blocked = evaluate(better, data, tmp_path / "m2", tmp_path / "p2", run_id=new_run(), floors=NO_FLOORS)
    assert not blocked.blessed and any(r.startswith(f"cannot score champion version {bogus.version}") for r in blocked.reasons)
    assert client.get_model_version_by_alias("chest-ct", "champion").version == bogus.version
