"""The whole pipeline through kfp.local (SubprocessRunner), as ``make run`` drives it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from chest_ct.records import Manifest
from pipelines.pipeline import chest_ct_pipeline
from pipelines.run_local import declared_inputs, parse_params
from tests.conftest import write_dataset

PROJECT = Path(__file__).resolve().parents[1]
FAST = [
    "image_size=32",
    "epochs=2",
    "batch_size=8",
    "base_weights=none",
    "augment_copies=1",
    "min_auc=0",
    "min_sensitivity=0",
    "min_specificity=0",
]


def run_local(tmp_path: Path, data: str, *params: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--data", data, "--runs-dir", str(tmp_path / "runs"), *params],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_parse_params_types_and_errors():
    declared = declared_inputs(chest_ct_pipeline)
    assert {
        "data_uri",
        "image_size",
        "epochs",
        "batch_size",
        "learning_rate",
        "base_weights",
        "target_sensitivity",
        "seed",
    } <= set(declared)
    assert parse_params(["epochs=3", "learning_rate=1e-4", "base_weights=none", "min_auc=0"], declared) == {
        "epochs": 3,
        "learning_rate": 1e-4,
        "base_weights": "none",
        "min_auc": 0.0,
    }
    with pytest.raises(SystemExit, match="parameter 'epoch': unknown; the pipeline takes"):
        parse_params(["epoch=3"], declared)
    with pytest.raises(SystemExit, match="parameter epochs='ten': expected int"):
        parse_params(["epochs=ten"], declared)
    with pytest.raises(SystemExit, match="expected name=value"):
        parse_params(["epochs"], declared)


@pytest.mark.slow
def test_whole_pipeline_runs_locally(tmp_path):
    data = write_dataset(
        tmp_path / "data", {"train": {"adenocarcinoma": 12, "normal": 10}, "valid": {"adenocarcinoma": 5, "normal": 5}}
    )
    proc = run_local(tmp_path, str(data), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {
        "model_dir",
        "mlflow_run_id",
        "metrics",
        "blessed",
        "validation_report",
        "evaluation_report",
        "report_html",
    } <= set(result)
    # The score's basis, without opening the report: the given valid folder, scored whole.
    assert (result["scored_images"], result["scored_groups"], result["excluded_images"]) == (10, 10, 0)
    model_dir = Path(result["model_dir"])
    assert (model_dir / "saved_model.pb").is_file() and (model_dir / "fitted_images.json").is_file()
    meta = json.loads((model_dir / "model_metadata.json").read_text())
    assert meta["mlflow_run_id"] == result["mlflow_run_id"] and meta["threshold"] == result["threshold"]
    assert meta["threshold_source"].startswith("out-of-fold")
    for unit in ("per_group", "per_image"):
        assert {"roc_auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "loss"} <= set(
            result["metrics"][unit]
        )
    report = json.loads(Path(result["validation_report"]).read_text())
    assert report["counts"]["test"] == {"normal": 5, "adenocarcinoma": 5}
    evaluation = json.loads(Path(result["evaluation_report"]).read_text())
    assert evaluation["per_group"] == result["metrics"]["per_group"]
    assert evaluation["decision"]["blessed"] == result["blessed"]
    assert sorted(p.name for p in Path(result["plots"]).iterdir()) == [
        "calibration.png",
        "confusion_matrix_per_group.png",
        "confusion_matrix_per_image.png",
        "precision_recall_curve.png",
        "roc_curve.png",
    ]
    page = Path(result["report_html"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="model-card"' in page and result["mlflow_run_id"] in page
    assert json.loads((tmp_path / "runs" / "latest.json").read_text()) == result
    for epoch in range(1, 3):
        assert f"epoch {epoch}/2 " in proc.stdout + proc.stderr, "a progress line per epoch"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["dataset_fingerprint"] == report["fingerprint"]
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_loss")) >= 1
    assert run.data.metrics["test_group_roc_auc"] == pytest.approx(result["metrics"]["per_group"]["roc_auc"])
    assert run.data.tags["blessed"] == str(result["blessed"]).lower()


@pytest.mark.slow
def test_reruns_repeat_and_a_moved_split_hides_the_champions_training_images(tmp_path):
    """Same seed: identical numbers. New seed: the champion is compared only on test images it never saw."""
    data = write_dataset(tmp_path / "data", {"": {"adenocarcinoma": 24, "normal": 24}})

    def run(seed: int) -> dict:
        proc = run_local(tmp_path, str(data), *FAST, f"seed={seed}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return {
            **result,
            "evaluation": json.loads(Path(result["evaluation_report"]).read_text()),
            "dataset": Path(result["validation_report"]).parent / "dataset",
        }

    first, again, moved = run(1), run(1), run(2)
    assert again["metrics"] == first["metrics"] and again["threshold"] == first["threshold"], "same seed, same run"
    assert again["evaluation"]["champion"]["excluded_as_seen_by_champion"] == {}, "same split: nothing to hide"

    record = json.loads((Path(again["model_dir"]) / "fitted_images.json").read_text())
    champion_saw = {i["sha256"] for i in record["images"]}
    test = [r for r in Manifest.load(moved["dataset"]).role("test")]
    expected_hidden = {r.path for r in test if r.sha256 in champion_saw}
    champion = moved["evaluation"]["champion"]
    assert expected_hidden, "the new split moved some of the champion's training pictures into test"
    assert set(champion["excluded_as_seen_by_champion"]) == expected_hidden
    assert champion["images"] == len(test) - len(expected_hidden)
    assert moved["scored_images"] == len(test), "the challenger never saw any of them"


@pytest.mark.slow
def test_pipeline_failure_is_reported_with_the_cause(tmp_path):
    proc = run_local(tmp_path, "ftp://example.org/data.zip", *FAST)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("Executing task \x1b[96m'ingest'") == 1, "no retries locally"
    assert "unsupported scheme 'ftp'" in proc.stdout + proc.stderr
    assert "pipeline failed" in proc.stderr


def test_bad_parameter_fails_before_running(tmp_path):
    proc = run_local(tmp_path, str(tmp_path), "epochs=lots")
    assert proc.returncode != 0 and "parameter epochs='lots': expected int" in proc.stderr
    assert not (tmp_path / "runs").exists()
