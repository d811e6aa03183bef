"""The chest-ct training pipeline: ingest -> base model -> train -> evaluate.

This file only wires components. The pipeline signature, which is what the
Kubeflow UI shows when starting a run, is the only signature with defaults; the
training and evaluation defaults are the constants of ``chest_ct.defaults``, which
the library functions use too.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Model

from chest_ct import defaults
from chest_ct.deploy import DEFAULT_READY_TIMEOUT_S
from chest_ct.inference_service import DEFAULT_IMAGE, DEFAULT_KSERVE_VERSION
from components import base_model, deploy, evaluate, ingest, train
from pipelines.cluster import INGEST_RETRIES, configure

PIPELINE_NAME = "chest-ct"


class PipelineOutputs(NamedTuple):
    model: Model
    validation_report: Artifact
    mlflow_run_id: str
    blessed: bool


#: The public zip the original tutorials download (adenocarcinoma and normal, train/test).
DEFAULT_DATA_URI = "https://drive.google.com/file/d/1z0mreUtRmR-P-magILsDR3T7M6IkGXtY/view?usp=sharing"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Train, evaluate and register a chest CT classifier (adenocarcinoma vs normal) on a frozen VGG16 base.",
)
def chest_ct_pipeline(
    data_uri: str = DEFAULT_DATA_URI,
    image_size: int = defaults.IMAGE_SIZE,
    epochs: int = defaults.EPOCHS,
    batch_size: int = defaults.BATCH_SIZE,
    learning_rate: float = defaults.LEARNING_RATE,
    base_weights: str = defaults.BASE_WEIGHTS,
    target_sensitivity: float = defaults.TARGET_SENSITIVITY,
    threshold_folds: int = defaults.THRESHOLD_FOLDS,
    seed: int = defaults.SEED,
    deterministic: bool = defaults.DETERMINISTIC,
    precision: str = defaults.PRECISION,
    augment_copies: int = defaults.AUGMENT_COPIES,
    fine_tune_epochs: int = defaults.FINE_TUNE_EPOCHS,
    patience: int = defaults.PATIENCE,
    valid_fraction: float = defaults.VALID_FRACTION,
    test_fraction: float = defaults.TEST_FRACTION,
    window_level: float = defaults.WINDOW_LEVEL,
    window_width: float = defaults.WINDOW_WIDTH,
    ood_quantile: float = defaults.OOD_QUANTILE,
    min_auc: float = defaults.MIN_AUC,
    min_sensitivity: float = defaults.MIN_SENSITIVITY,
    min_specificity: float = defaults.MIN_SPECIFICITY,
    max_auc_drop: float = defaults.MAX_AUC_DROP,
    min_compare_per_class: int = defaults.MIN_COMPARE_PER_CLASS,
    registered_model_name: str = defaults.REGISTERED_MODEL,
    experiment: str = defaults.EXPERIMENT,
    s3_endpoint_url: str = "",
    deploy_model: bool = True,
    model_store_uri: str = "s3://chest-ct-models/chest-ct",
    serving_image: str = DEFAULT_IMAGE,
    inference_service_name: str = "chest-ct",
    serving_namespace: str = "chest-ct",
    canary_traffic_percent: int = 0,
    kserve_version: str = DEFAULT_KSERVE_VERSION,
    ready_timeout_seconds: int = DEFAULT_READY_TIMEOUT_S,
) -> PipelineOutputs:
    # The source behind a fixed URI changes between scheduled runs: never reuse a cached download.
    ingest_task = ingest(
        data_uri=data_uri,
        seed=seed,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        window_level=window_level,
        window_width=window_width,
        s3_endpoint_url=s3_endpoint_url,
    ).set_display_name("ingest")
    configure(ingest_task, "ingest", cache=False, retries=INGEST_RETRIES)
    base_task = base_model(image_size=image_size, base_weights=base_weights, seed=seed).set_display_name("base model")
    configure(base_task, "base-model")
    train_task = train(
        dataset=ingest_task.outputs["dataset"],
        base_model=base_task.outputs["model"],
        validation_report=ingest_task.outputs["validation_report"],
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        augment_copies=augment_copies,
        fine_tune_epochs=fine_tune_epochs,
        patience=patience,
        seed=seed,
        deterministic=deterministic,
        precision=precision,
        target_sensitivity=target_sensitivity,
        threshold_folds=threshold_folds,
        window_level=window_level,
        window_width=window_width,
        ood_quantile=ood_quantile,
        experiment=experiment,
        pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    ).set_display_name("train")
    configure(train_task, "train", gpu=True)
    eval_task = evaluate(
        dataset=ingest_task.outputs["dataset"],
        model=train_task.outputs["model"],
        mlflow_run_id=train_task.outputs["mlflow_run_id"],
        min_auc=min_auc,
        min_sensitivity=min_sensitivity,
        min_specificity=min_specificity,
        max_auc_drop=max_auc_drop,
        min_compare_per_class=min_compare_per_class,
        registered_model_name=registered_model_name,
        experiment=experiment,
        base_weights=base_weights,
    ).set_display_name("evaluate")
    configure(eval_task, "evaluate", cache=False)  # talks to the model registry: always run
    with dsl.If(eval_task.outputs["blessed"] == True, name="blessed"):  # noqa: E712 (KFP condition)
        with dsl.If(deploy_model == True, name="deploy-enabled"):  # noqa: E712
            deploy_task = deploy(
                model=eval_task.outputs["evaluated_model"],
                mlflow_run_id=train_task.outputs["mlflow_run_id"],
                model_store_uri=model_store_uri,
                serving_image=serving_image,
                inference_service_name=inference_service_name,
                namespace=serving_namespace,
                canary_traffic_percent=canary_traffic_percent,
                kserve_version=kserve_version,
                ready_timeout_seconds=ready_timeout_seconds,
                s3_endpoint_url=s3_endpoint_url,
            ).set_display_name("deploy")
            configure(deploy_task, "deploy", cache=False)
    return PipelineOutputs(
        model=eval_task.outputs["evaluated_model"],
        validation_report=ingest_task.outputs["validation_report"],
        mlflow_run_id=train_task.outputs["mlflow_run_id"],
        blessed=eval_task.outputs["blessed"],
    )
