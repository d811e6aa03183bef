from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from components.image import TRAIN_IMAGE


# KFP reads the outputs from the NamedTuple(...) call in the signature (the function's source travels
# alone into the container), a form mypy refuses as a type: hence the ignore on that line.
@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def deploy(
    model: Input[Model],
    mlflow_run_id: str,
    model_store_uri: str,
    serving_image: str,
    inference_service_name: str,
    namespace: str,
    canary_traffic_percent: int,
    kserve_version: str,
    ready_timeout_seconds: int,
    s3_endpoint_url: str,
) -> NamedTuple("DeployOutputs", [("storage_uri", str)]):  # type: ignore[valid-type]
    """Upload the blessed SavedModel, roll the InferenceService to it and wait until it serves."""
    from pathlib import Path

    from chest_ct.deploy import deploy_model

    done = deploy_model(
        Path(model.path),
        model_store_uri=model_store_uri,
        version=mlflow_run_id,
        name=inference_service_name,
        namespace=namespace,
        image=serving_image,
        kserve_version=kserve_version,
        canary_traffic_percent=canary_traffic_percent or None,
        s3_endpoint_url=s3_endpoint_url or None,
        ready_timeout_s=ready_timeout_seconds,
    )
    print(f"InferenceService {namespace}/{inference_service_name} {done.change.action}: {done.change.note}", flush=True)
    print(f"serving {done.storage_uri}: {done.status.describe()}", flush=True)
    return (done.storage_uri,)
