"""The pipeline's train step: fit, choose the threshold out-of-fold, fit the guard, export, log to MLflow.

The fitting itself is :mod:`chest_ct.fitting`, the threshold :mod:`chest_ct.threshold`,
the out-of-distribution guard :mod:`chest_ct.ood`; this module wires them to the
dataset artifact, MLflow and the exported model, which carries the threshold, the
guard, the DICOM window and the record of every image it was fitted or
early-stopped on (:mod:`chest_ct.seen_images`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np

from chest_ct import CLASS_NAMES, POSITIVE_CLASS, defaults, registry
from chest_ct.determinism import seed_everything
from chest_ct.devices import training_strategy
from chest_ct.export import export_saved_model, read_metadata, write_metadata
from chest_ct.fitting import FINE_TUNED, Examples, TrainResult, fit_classifier
from chest_ct.fold_head import head_fit_predict
from chest_ct.golden import encode_golden, pick_golden, write_golden_set
from chest_ct.model import image_size_of, split_model
from chest_ct.ood import Guard, block_features, check_quantile, fit_guard
from chest_ct.records import FITTING_ROLES, TRAIN, VALID, Manifest
from chest_ct.seen_images import SEEN_FILE, write_seen
from chest_ct.threshold import ThresholdChoice, check_target, out_of_fold_threshold
from chest_ct.window import LUNG_WINDOW, Window

log = logging.getLogger(__name__)


def check_class_order(manifest: Manifest) -> None:
    """Labels are indices into the dataset's classes; the exported model names them CLASS_NAMES."""
    if tuple(manifest.classes) != CLASS_NAMES:
        raise ValueError(
            f"{manifest.root}: dataset classes {list(manifest.classes)} are not in the exported order "
            f"{list(CLASS_NAMES)} (index 1 is the positive class, {POSITIVE_CLASS!r}); "
            "ingest the dataset with the default classes"
        )


def train_and_export(
    dataset_dir: Path,
    base_model_file: Path,
    out_dir: Path,
    *,
    experiment: str = defaults.EXPERIMENT,
    tags: dict[str, str] | None = None,
    extra_artifacts: dict[str, Path] | None = None,
    target_sensitivity: float = defaults.TARGET_SENSITIVITY,
    threshold_folds: int = defaults.THRESHOLD_FOLDS,
    window: Window = LUNG_WINDOW,
    ood_quantile: float = defaults.OOD_QUANTILE,
    **hyper: Any,
) -> str:
    """Open an MLflow run, train, choose the threshold, fit the guard, export; return the run id.

    ``hyper`` takes :func:`chest_ct.fitting.fit_classifier`'s keyword arguments (epochs, batch_size, seed, ...).
    ``window``: how DICOM slices are shown to the model (training and the exported ``serve_hu``).
    ``ood_quantile``: the share of in-distribution images the guard is calibrated to accept.
    """
    manifest = Manifest.load(dataset_dir)
    check_class_order(manifest)
    check_target(target_sensitivity)
    check_quantile(ood_quantile)
    # Seeded before loading: layers draw their random-state seeds when they are created.
    seed_everything(hyper.get("seed", defaults.SEED), hyper.get("deterministic", defaults.DETERMINISTIC))
    strategy = training_strategy()  # two or more GPUs: mirrored on each; else one device
    with strategy.scope():
        model = keras.models.load_model(base_model_file)
    train, valid = Examples.of_role(manifest, TRAIN), Examples.of_role(manifest, VALID)
    params = {
        **hyper,
        "target_sensitivity": target_sensitivity,
        "threshold_folds": threshold_folds,
        "precision": hyper.get("precision", defaults.PRECISION),
        "replicas": strategy.num_replicas_in_sync,
        "image_size": image_size_of(model),
        "dataset_fingerprint": manifest.fingerprint,
        "window_level": window.level,
        "window_width": window.width,
        "ood_quantile": ood_quantile,
        "train_images": len(train),
        "valid_images": len(valid),
        "train_groups": len(set(train.groups)),
        "valid_groups": len(set(valid.groups)),
    }
    run_id = registry.start_run(experiment, params, tags)
    epochs = hyper.get("epochs", defaults.EPOCHS)

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        registry.log_epoch(run_id, epoch, logs)
        log.info("epoch %d/%d %s", epoch, epochs, " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())))

    # Inside the run's context, so a failure marks the MLflow run FAILED instead of leaving it FINISHED.
    with mlflow.start_run(run_id=run_id):
        with strategy.scope():  # models, and the folds' fresh heads, live on every replica
            result = fit_classifier(model, train, valid, on_epoch=on_epoch, window=window, **hyper)
            mlflow.log_params({"precision_used": result.precision.policy, "precision_device": result.precision.device})
            mlflow.set_tag("precision_reason", result.precision.reason[:5000])
            choice = out_of_fold_threshold(
                [*train.labels, *valid.labels],
                [*train.groups, *valid.groups],
                head_fit_predict(
                    result,
                    train,
                    valid,
                    batch_size=hyper.get("batch_size", defaults.BATCH_SIZE),
                    learning_rate=hyper.get("learning_rate", defaults.LEARNING_RATE),
                ),
                target_sensitivity=target_sensitivity,
                folds=threshold_folds,
                seed=hyper.get("seed", defaults.SEED),
                class_names=manifest.classes,
            )
            if result.exported_stage == FINE_TUNED:
                choice.note = "; ".join(
                    filter(None, [choice.note, "folds fit the head only, the exported model is fine-tuned"])
                )
            # The guard reads the exported model's own base on the clean fitting images: the frozen base's
            # features from fitting's one pass (in the precision training ran in, as a server of that precision
            # computes them; evaluate's precision agreement counts the guard flips between fp32 and bf16),
            # or a new pass when fine-tuning changed the base.
            blocks = (
                result.features.blocks
                if result.exported_stage != FINE_TUNED
                else block_features(
                    result.model,
                    [*train.files, *valid.files],
                    image_size_of(model),
                    hyper.get("batch_size", defaults.BATCH_SIZE),
                    window,
                )
            )
            guard = fit_guard(blocks, [*train.groups, *valid.groups], quantile=ood_quantile)
        # Outside the scope: a SavedModel loaded inside it (the golden set's answers) gets mirrored variables.
        summary = _export(result, choice, manifest, out_dir, run_id, train, valid, guard, window)
        mlflow.log_metrics(
            {
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "best_val_loss": result.best_val_loss,
                "threshold": choice.threshold,
                "threshold_fold_spread": choice.spread,
                "oof_brier_per_image": choice.calibration["per_image"]["brier"],
                "oof_ece_per_image": choice.calibration["per_image"]["ece"],
                "oof_brier_per_group": choice.calibration["per_group"]["brier"],
                "ood_threshold": guard.threshold,
                "ood_out_of_fold_accepted": guard.calibration["out_of_fold_accepted"],
            }
        )
        mlflow.set_tags({"exported_stage": result.exported_stage, "threshold_source": choice.source()[:5000]})
        mlflow.log_dict(
            {**summary, "history": result.history, "fine_tune_history": result.fine_tune_history},
            "training/history.json",
        )
        mlflow.log_dict(choice.to_dict(), "training/threshold.json")
        mlflow.log_dict(guard.metadata(), "training/ood_guard.json")
        mlflow.log_artifact(str(Path(out_dir) / SEEN_FILE), "training")
        for name, path in (extra_artifacts or {}).items():
            mlflow.log_artifact(str(path), f"training/{name}")
    log.info("training done: %s", json.dumps(summary))
    return run_id


def _export(
    result: TrainResult,
    choice: ThresholdChoice,
    manifest: Manifest,
    out_dir: Path,
    run_id: str,
    train: Examples,
    valid: Examples,
    guard: Guard,
    window: Window,
) -> dict[str, Any]:
    """Write the SavedModel, its fitted-image record, golden set and metadata; return the training summary."""
    summary = {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_val_loss": result.best_val_loss,
        "exported_stage": result.exported_stage,
        "train_examples": result.train_examples,
        "threshold": choice.threshold,
        "threshold_fold_thresholds": choice.fold_thresholds,
    }
    export_saved_model(
        result.model,
        out_dir,
        {
            "mlflow_run_id": run_id,
            "dataset_fingerprint": manifest.fingerprint,
            "threshold": choice.threshold,
            "threshold_source": choice.source(),
        },
        guard=guard,
        window=window,
    )
    seen = write_seen(out_dir, (r for r in manifest.records if r.split in FITTING_ROLES))
    _golden_set(result, choice.threshold, out_dir, train, valid)
    metadata = read_metadata(out_dir)
    metadata.update(
        fitted_images=seen,
        training={
            **{k: summary[k] for k in ("best_epoch", "best_val_loss", "exported_stage", "epochs_run")},
            "precision": result.precision.to_dict(),
        },
    )
    write_metadata(out_dir, metadata)
    return summary


def _golden_set(result: TrainResult, threshold: float, out_dir: Path, train: Examples, valid: Examples) -> None:
    """Store a few fitting images with the model for the server's reduced-precision check (chest_ct/golden.py).

    Picked on the head's probabilities for the cached features, clear of the threshold by twice the
    tolerance (the exported model's own float32 answers, stored with them, may differ a little).
    """
    _, head = split_model(result.model)
    features = np.concatenate([result.features.train, result.features.valid])
    probabilities = np.asarray(head(features, training=False)).reshape(-1)
    files, labels, groups = [*train.files, *valid.files], [*train.labels, *valid.labels], [*train.groups, *valid.groups]
    picked = pick_golden(probabilities, labels, groups, threshold, margin=2 * defaults.PRECISION_TOLERANCE)
    if not picked:
        log.warning(
            "no fitting image lies clear of the threshold: the model has no golden set and will be "
            "served in float32 only"
        )
        return
    write_golden_set(
        out_dir,
        encode_golden([files[i] for i in picked], image_size_of(result.model)),
        f"{len(picked)} fitting images, both classes, one per picture, re-encoded as PNG at the model's input size",
    )
