"""MLflow tracking and model registry: one run per training, aliases for promotion.

A model version moves through two aliases of the registered model:
``candidate`` (every evaluated model) and ``champion`` (the one to serve), so
deployment tooling and people can always ask MLflow "what should be live?".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from chest_ct import defaults

CANDIDATE, CHAMPION = "candidate", "champion"
SAVED_MODEL_ARTIFACT = "saved_model"


def use_tracking(experiment: str = defaults.EXPERIMENT) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (its own default otherwise) and the experiment."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(experiment)
    return mlflow.get_tracking_uri()


def start_run(experiment: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """Create the training run; later steps reopen it by id to add their results."""
    use_tracking(experiment)
    with mlflow.start_run(tags=tags or {}) as run:
        mlflow.log_params(params)
    return run.info.run_id


def log_epoch(run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in metrics.items()}, step=epoch, run_id=run_id)


def register(name: str, run_id: str, alias: str = CANDIDATE) -> str:
    """Register ``runs:/<run_id>/saved_model`` as a new version of ``name``; return the version."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description="Chest CT classifier (adenocarcinoma vs normal), "
            "TensorFlow SavedModel with model_metadata.json",
        )
    version = client.create_model_version(name, source=f"runs:/{run_id}/{SAVED_MODEL_ARTIFACT}", run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def champion(name: str) -> tuple[str, str] | None:
    """``(version, source)`` of the current champion, or None when there is none yet."""
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), version.source or ""


def download(source: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))


def promote_if_unchanged(name: str, version: str, expected_champion: str | None) -> str:
    """Make ``version`` the champion unless the champion moved since it was compared against.

    Returns "" when promoted, else why not. MLflow has no compare-and-set on
    aliases, so the alias is re-read right before it is set: of two overlapping
    runs compared against the same champion, the later one sees the change and
    stands down instead of silently replacing a model it was never compared with.
    """
    current = champion(name)
    now = current[0] if current else None
    if now != expected_champion:
        return (
            f"champion changed during evaluation (compared against {expected_champion or 'no champion'}, "
            f"now version {now}): not promoted; evaluate again against the new champion"
        )
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return ""
