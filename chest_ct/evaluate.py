"""Evaluate an exported model on held-out data and decide whether it may ship.

Predictions come from the exported SavedModel's bytes signature, i.e. the exact
graph the server will run, not from the Keras object used in training.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from chest_ct import registry
from chest_ct.export import load_predictor, read_metadata, write_metadata
from chest_ct.ingest import load_manifest
from chest_ct.metrics import choose_threshold, classification_metrics, roc_points, save_plots
from chest_ct.shortcut import shortcut_audit

EVAL_SPLIT = "test"
#: The threshold is chosen where the model was not fitted, but not on the split it
#: is then scored on: choosing and scoring on the same images flatters sensitivity.
THRESHOLD_SPLIT = "valid"


@dataclass
class Floors:
    """Absolute minimums on the evaluation split; a model below any of them is not blessed."""

    roc_auc: float = 0.80
    sensitivity: float = 0.90
    specificity: float = 0.50

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"min_{name}={value}: expected a number between 0 and 1")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    threshold: float
    valid_sensitivity: float
    blessed: bool
    reasons: list[str]
    shortcut: dict
    model_version: str
    roc: list[tuple[float, float, float]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)


def blessing_decision(metrics: dict[str, float], floors: Floors, champion_metrics: dict[str, float] | None,
                      max_auc_drop: float) -> tuple[bool, list[str]]:
    """Bless only above every floor and without an AUC regression against the champion.

    AUC is compared because it does not depend on either model's threshold; both
    models are scored on the same evaluation images.
    """
    reasons = []
    for name, floor in vars(floors).items():
        if not metrics[name] >= floor:
            reasons.append(f"{name} {metrics[name]:.4f} is below the floor {floor:.4f}")
    if champion_metrics is not None:
        if metrics["roc_auc"] < champion_metrics["roc_auc"] - max_auc_drop:
            reasons.append(f"roc_auc {metrics['roc_auc']:.4f} regresses against the champion's "
                           f"{champion_metrics['roc_auc']:.4f} on the same data (allowed drop {max_auc_drop})")
    return not reasons, reasons


def evaluate(
    model_dir: Path,
    dataset_dir: Path,
    out_model_dir: Path,
    plots_dir: Path,
    *,
    run_id: str,
    target_sensitivity: float = 0.95,
    floors: Floors | None = None,
    max_auc_drop: float = 0.01,
    registered_model_name: str = registry.DEFAULT_REGISTERED_MODEL,
    experiment: str = registry.DEFAULT_EXPERIMENT,
) -> Evaluation:
    floors = floors or Floors()
    if not 0.0 <= max_auc_drop <= 1.0:
        raise ValueError(f"max_auc_drop={max_auc_drop}: expected a number between 0 and 1")
    manifest = load_manifest(dataset_dir)
    metadata = read_metadata(model_dir)
    positive = metadata["positive_class"]
    records = {split: [r for r in manifest["records"] if r["split"] == split]
               for split in ("train", THRESHOLD_SPLIT, EVAL_SPLIT)}
    for split in (THRESHOLD_SPLIT, EVAL_SPLIT):
        if len({r["label"] for r in records[split]}) < 2:
            raise ValueError(f"{dataset_dir}: the '{split}' split needs both classes to evaluate")
    eval_records = records[EVAL_SPLIT]
    encoded = [(Path(dataset_dir) / r["file"]).read_bytes() for r in eval_records]
    y = [int(r["label"] == positive) for r in eval_records]

    predict = load_predictor(model_dir)
    y_valid = [int(r["label"] == positive) for r in records[THRESHOLD_SPLIT]]
    prob_valid = predict([(Path(dataset_dir) / r["file"]).read_bytes() for r in records[THRESHOLD_SPLIT]])
    threshold = choose_threshold(y_valid, prob_valid, target_sensitivity)
    prob = predict(encoded)
    metrics = classification_metrics(y, prob, threshold)
    valid_sensitivity = classification_metrics(y_valid, prob_valid, threshold)["sensitivity"]
    audit = shortcut_audit(records["train"], eval_records, positive, metrics["roc_auc"])
    plots = save_plots(y, prob, threshold, metadata["class_names"], plots_dir)

    # The evaluated model is the trained one plus the threshold chosen here.
    if Path(out_model_dir).exists():
        shutil.rmtree(out_model_dir)
    shutil.copytree(model_dir, out_model_dir)
    metadata.update(threshold=threshold, mlflow_run_id=run_id,
                    threshold_source=f"target_sensitivity={target_sensitivity} on the '{THRESHOLD_SPLIT}' split "
                                     f"({len(y_valid)} images, sensitivity there {valid_sensitivity:.3f})",
                    evaluation=metrics)
    write_metadata(out_model_dir, metadata)

    registry.use_tracking(experiment)
    champion_metrics, champion_note, champion_error = _champion_metrics(registered_model_name, encoded, y)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics({"shortcut_statistics_auc": audit["statistics_auc"],
                            "valid_sensitivity_at_threshold": valid_sensitivity})
        mlflow.set_tags({"shortcut_warning": str(audit["warning"]).lower(), "shortcut_message": audit["message"][:5000]})
        for path in plots.values():
            mlflow.log_artifact(str(path), "plots")
        mlflow.log_dict(audit, "evaluation/shortcut_audit.json")
        mlflow.log_artifacts(str(out_model_dir), registry.SAVED_MODEL_ARTIFACT)
        version = registry.register(registered_model_name, run_id, registry.CANDIDATE)
        blessed, reasons = blessing_decision(metrics, floors, champion_metrics, max_auc_drop)
        if champion_error:
            blessed, reasons = False, [*reasons, champion_error]
        if blessed:
            registry.promote(registered_model_name, version)
        summary = "blessed as champion" if blessed else "not blessed: " + "; ".join(reasons)
        mlflow.set_tags({"blessed": str(blessed).lower(), "blessing": summary[:5000],
                         "registered_version": version})
        mlflow.log_dict({"blessed": blessed, "reasons": reasons, "champion": champion_note,
                         "floors": vars(floors), "max_auc_drop": max_auc_drop}, "evaluation/blessing.json")

    tn, fp, fn, tp = metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]
    return Evaluation(metrics=metrics, threshold=threshold, valid_sensitivity=valid_sensitivity, blessed=blessed,
                      reasons=reasons, shortcut=audit,
                      model_version=version, roc=roc_points(y, prob), confusion=[[tn, fp], [fn, tp]],
                      plots={k: str(v) for k, v in plots.items()})


def _champion_metrics(name: str, encoded: list[bytes], y: list[int]) -> tuple[dict | None, str, str | None]:
    """Score the current champion on the same images: ``(metrics, note, error)``.

    A champion that cannot be scored blocks promotion (error) rather than letting
    an unchecked model replace it silently.
    """
    current = registry.champion(name)
    if current is None:
        return None, "no champion yet", None
    version, source = current
    with tempfile.TemporaryDirectory() as tmp:
        try:
            champ_dir = registry.download(source, Path(tmp))
            champ_threshold = read_metadata(champ_dir)["threshold"]
            prob = load_predictor(champ_dir)(encoded)
        except Exception as exc:  # a broken champion must not break evaluation
            error = f"cannot score champion version {version} ({source}): {exc}"
            return None, error, error
    return (classification_metrics(y, prob, champ_threshold),
            f"champion version {version} scored on the same data", None)


def evaluation_summary(result: Evaluation) -> str:
    """Markdown for the KFP UI."""
    m = result.metrics
    lines = [
        "# chest-ct evaluation",
        "",
        f"**{'BLESSED (champion)' if result.blessed else 'NOT BLESSED'}**, registered version {result.model_version}",
        *[f"- {r}" for r in result.reasons],
        "",
        f"Threshold {result.threshold:.4f}: sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}, "
        f"precision {m['precision']:.3f}, F1 {m['f1']:.3f}, accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.3f}, "
        f"loss {m['loss']:.4f}",
        "",
        ("## " if result.shortcut["warning"] else "") + result.shortcut["message"],
        "",
        "Single-statistic AUCs: " + json.dumps(result.shortcut["single_feature_auc"]),
    ]
    return "\n".join(lines) + "\n"
