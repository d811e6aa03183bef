from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import TRAIN_IMAGE


# KFP reads the outputs from the NamedTuple(...) call in the signature (the function's source travels
# alone into the container), a form mypy refuses as a type: hence the ignore on that line.
@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    base_model: Input[Model],
    validation_report: Input[Artifact],
    model: Output[Model],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    augment_copies: int,
    patience: int,
    seed: int,
    fine_tune_epochs: int,
    deterministic: bool,
    precision: str,
    target_sensitivity: float,
    threshold_folds: int,
    window_level: float,
    window_width: float,
    ood_quantile: float,
    experiment: str,
    pipeline_run: str,
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str)]):  # type: ignore[valid-type]
    """Train the head on the frozen base, choose the threshold out-of-fold, fit the out-of-distribution guard,
    log to MLflow, export the SavedModel (DICOM slices through the window in its ``serve_hu`` signature)."""
    from pathlib import Path

    from chest_ct import show_progress
    from chest_ct.devices import check_gpus, expected_gpus
    from chest_ct.train import train_and_export
    from chest_ct.window import Window

    show_progress()
    check_gpus(expected_gpus())  # GPUs requested but invisible to TensorFlow: stop now, not after hours on CPU
    run_id = train_and_export(
        Path(dataset.path),
        Path(base_model.path) / "model.keras",
        Path(model.path),
        experiment=experiment,
        tags={"kfp_run": pipeline_run} if pipeline_run else None,
        extra_artifacts={"validation_report.json": Path(validation_report.path)},
        target_sensitivity=target_sensitivity,
        threshold_folds=threshold_folds,
        window=Window(level=window_level, width=window_width),
        ood_quantile=ood_quantile,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        augment_copies=augment_copies,
        patience=patience,
        seed=seed,
        fine_tune_epochs=fine_tune_epochs,
        deterministic=deterministic,
        precision=precision,
    )
    model.metadata.update(mlflow_run_id=run_id, format="tf-savedmodel")
    return (run_id,)
