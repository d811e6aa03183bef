from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import TRAIN_IMAGE


# KFP reads the outputs from the NamedTuple(...) call in the signature (the function's source travels
# alone into the container), a form mypy refuses as a type: hence the ignore on that line.
@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    mlflow_run_id: str,
    evaluated_model: Output[Model],
    test_metrics: Output[Metrics],
    test_roc_confusion: Output[ClassificationMetrics],
    evaluation_summary: Output[Markdown],
    evaluation_report: Output[Artifact],
    report_html: Output[HTML],
    plots: Output[Artifact],
    min_auc: float,
    min_sensitivity: float,
    min_specificity: float,
    max_auc_drop: float,
    min_compare_per_class: int,
    registered_model_name: str,
    experiment: str,
    base_weights: str,
) -> NamedTuple("EvaluateOutputs", [("blessed", bool), ("reasons", str), ("model_version", str)]):  # type: ignore[valid-type]
    """Score on test images the model never saw, audit shortcuts, register, and bless on per-group metrics.

    ``report_html`` is the readable report (the KFP UI shows it; MLflow has it as
    ``evaluation/report.html``); ``base_weights`` is only named in its model card.
    """
    import json
    from pathlib import Path

    from chest_ct import CLASS_NAMES, show_progress
    from chest_ct.blessing import BlessingPolicy
    from chest_ct.evaluate import evaluate_model, summary_markdown

    show_progress()
    result = evaluate_model(
        Path(model.path),
        Path(dataset.path),
        Path(evaluated_model.path),
        Path(plots.path),
        run_id=mlflow_run_id,
        registered_model_name=registered_model_name,
        experiment=experiment,
        report_html=Path(report_html.path),
        base_weights=base_weights,
        policy=BlessingPolicy(
            min_auc=min_auc,
            min_sensitivity=min_sensitivity,
            min_specificity=min_specificity,
            max_auc_drop=max_auc_drop,
            min_compare_per_class=min_compare_per_class,
        ),
    )
    for unit in ("per_group", "per_image"):
        for name, value in result.report[unit].items():
            test_metrics.log_metric(f"{unit}_{name}", value)
    for name in ("scored_images", "scored_groups", "excluded_images", "threshold"):
        test_metrics.log_metric(name, result.report[name])
    test_metrics.log_metric("shortcut_statistics_auc", result.report["shortcut"]["statistics_auc"])
    for name in ("test_accept_rate", "foreign_reject_rate"):  # the out-of-distribution guard
        test_metrics.log_metric(f"guard_{name}", result.report["guard"][name])
    fpr, tpr, thresholds = (list(col) for col in zip(*result.roc(), strict=True))
    test_roc_confusion.log_roc_curve(fpr, tpr, thresholds)  # per picture, as the blessing
    test_roc_confusion.log_confusion_matrix(list(CLASS_NAMES), result.confusion())
    summary = summary_markdown(result)
    Path(evaluation_summary.path).write_text(summary)
    Path(evaluation_report.path).write_text(json.dumps(result.report, indent=2))
    evaluated_model.metadata.update(
        mlflow_run_id=mlflow_run_id,
        threshold=result.scores.threshold,
        blessed=result.blessed,
        registered_version=result.model_version,
        plots=result.plots,
    )
    print(summary, flush=True)
    return (result.blessed, "; ".join(result.reasons), result.model_version)
