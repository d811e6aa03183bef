from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Model

from components.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def deploy(
    model: Input[Model],
    mlflow_run_id: str,
    model_store_uri: str,
    serving_image: str,
    inference_service_name: str = "chest-ct",
    namespace: str = "chest-ct",
    canary_traffic_percent: int = 0,
    s3_endpoint_url: str = "",
) -> NamedTuple("DeployOutputs", [("storage_uri", str)]):
    """Upload the blessed SavedModel to the model store and roll the InferenceService to it."""
    from pathlib import Path

    from chest_ct.deploy import apply_inference_service, inference_service, upload_model_dir

    storage_uri = upload_model_dir(Path(model.path), f"{model_store_uri.rstrip('/')}/{mlflow_run_id}",
                                   s3_endpoint_url or None)
    service = inference_service(inference_service_name, namespace, serving_image, storage_uri,
                                canary_traffic_percent=canary_traffic_percent or None)
    apply_inference_service(service, namespace)
    print(f"InferenceService {namespace}/{inference_service_name} now serves {storage_uri}", flush=True)
    return (storage_uri,)
