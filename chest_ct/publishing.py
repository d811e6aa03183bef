"""Publish an evaluation: MLflow metrics, tags and artifacts, the registry version, the champion alias."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from chest_ct import registry
from chest_ct.blessing import Decision


def _numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def publish(
    run_id: str,
    evaluated_model_dir: Path,
    report: dict[str, Any],
    plots: dict[str, Path],
    decision: Decision,
    *,
    registered_model_name: str,
    expected_champion: str | None,
) -> str:
    """Log the evaluation into the training run, register the model, promote it if blessed; return the version.

    Promotion re-checks the champion alias right before setting it (see
    :func:`chest_ct.registry.promote_if_unchanged`); if it moved, ``decision`` is
    turned into a refusal with that reason.
    """
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {
                **_numbers("test_image_", report["per_image"]),
                **_numbers("test_group_", report["per_group"]),
                "scored_images": report["scored_images"],
                "scored_groups": report["scored_groups"],
                "excluded_images": report["excluded_images"],
                "shortcut_statistics_auc": report["shortcut"]["statistics_auc"],
            }
        )
        mlflow.set_tags(
            {
                "shortcut_warning": str(report["shortcut"]["warning"]).lower(),
                "shortcut_message": report["shortcut"]["message"][:5000],
                "git_commit": str(report.get("git_commit", "unknown")),
            }
        )
        for path in plots.values():
            mlflow.log_artifact(str(path), "plots")
        mlflow.log_dict(report["shortcut"], "evaluation/shortcut_audit.json")
        mlflow.log_artifacts(str(evaluated_model_dir), registry.SAVED_MODEL_ARTIFACT)
        version = registry.register(registered_model_name, run_id, registry.CANDIDATE)
        if decision.blessed:
            why_not = registry.promote_if_unchanged(registered_model_name, version, expected_champion)
            if why_not:
                decision.refuse(why_not)
        summary = ("blessed as champion" if decision.blessed else "not blessed") + (
            ": " + "; ".join(decision.reasons) if decision.reasons else ""
        )
        mlflow.set_tags(
            {"blessed": str(decision.blessed).lower(), "blessing": summary[:5000], "registered_version": version}
        )
        report["decision"] = {**report["decision"], "blessed": decision.blessed, "reasons": decision.reasons}
        mlflow.log_dict(report["decision"], "evaluation/blessing.json")
        mlflow.log_dict(report, "evaluation/report.json")
    return version


#: Where the HTML report lands in the run's artifacts (MLflow's artifact view shows it).
REPORT_HTML_ARTIFACT = "evaluation/report.html"


def log_report_html(run_id: str, path: Path) -> None:
    """Log the HTML report as ``evaluation/report.html`` whatever its file is called (KFP names output files)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(REPORT_HTML_ARTIFACT).name
        shutil.copyfile(path, copy)
        MlflowClient().log_artifact(run_id, str(copy), str(Path(REPORT_HTML_ARTIFACT).parent))
