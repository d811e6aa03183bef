from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    mlflow_run_id: str,
    evaluated_model: Output[Model],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    evaluation_summary: Output[Markdown],
    plots: Output[Artifact],
    target_sensitivity: float = 0.95,
    min_auc: float = 0.8,
    min_sensitivity: float = 0.9,
    min_specificity: float = 0.5,
    max_auc_drop: float = 0.01,
    registered_model_name: str = "chest-ct",
    experiment: str = "chest-ct",
) -> NamedTuple("EvaluateOutputs", [("blessed", bool), ("reasons", str), ("model_version", str)]):
    """Score on held-out data, pick the threshold, audit shortcuts, register and maybe bless."""
    from pathlib import Path

    from chest_ct import CLASS_NAMES
    from chest_ct.evaluate import Floors, evaluate as run_evaluation, evaluation_summary as summarise

    result = run_evaluation(
        Path(model.path), Path(dataset.path), Path(evaluated_model.path), Path(plots.path),
        run_id=mlflow_run_id, target_sensitivity=target_sensitivity,
        floors=Floors(roc_auc=min_auc, sensitivity=min_sensitivity, specificity=min_specificity),
        max_auc_drop=max_auc_drop, registered_model_name=registered_model_name, experiment=experiment,
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    metrics.log_metric("shortcut_statistics_auc", result.shortcut["statistics_auc"])
    fpr, tpr, thresholds = (list(col) for col in zip(*result.roc))
    classification_metrics.log_roc_curve(fpr, tpr, thresholds)
    classification_metrics.log_confusion_matrix(list(CLASS_NAMES), result.confusion)
    summary = summarise(result)
    Path(evaluation_summary.path).write_text(summary)
    evaluated_model.metadata.update(mlflow_run_id=mlflow_run_id, threshold=result.threshold, blessed=result.blessed,
                                    registered_version=result.model_version, plots=result.plots)
    print(summary, flush=True)
    return (result.blessed, "; ".join(result.reasons), result.model_version)
