"""Kubernetes settings of the pipeline's tasks, fixed when the pipeline is compiled.

KFP resolves accelerators, node selectors and tolerations at compile time, so
they come from environment variables read here (defaults: a GKE node pool with
one NVIDIA T4 per training pod). ``kfp.local`` ignores all of this.

Other clouds (set before ``make compile``):
    EKS: CHEST_CT_GPU_NODE_SELECTOR=k8s.amazonaws.com/accelerator=nvidia-tesla-t4
    AKS: CHEST_CT_GPU_NODE_SELECTOR=accelerator=nvidia
    no GPU: CHEST_CT_GPU_COUNT=0
Also: CHEST_CT_GPU_RESOURCE, CHEST_CT_GPU_TOLERATION_KEY, CHEST_CT_MLFLOW_SECRET, CHEST_CT_S3_SECRET,
CHEST_CT_INGEST_RETRIES.
"""

from __future__ import annotations

import os

from kfp import kubernetes
from kfp.dsl import PipelineTask

from chest_ct.devices import EXPECTED_GPUS_ENV

GPU_COUNT = int(os.environ.get("CHEST_CT_GPU_COUNT", "1"))
GPU_RESOURCE = os.environ.get("CHEST_CT_GPU_RESOURCE", "nvidia.com/gpu")
GPU_NODE_SELECTOR = os.environ.get("CHEST_CT_GPU_NODE_SELECTOR", "cloud.google.com/gke-accelerator=nvidia-tesla-t4")
GPU_TOLERATION_KEY = os.environ.get("CHEST_CT_GPU_TOLERATION_KEY", "nvidia.com/gpu")
MLFLOW_SECRET = os.environ.get("CHEST_CT_MLFLOW_SECRET", "mlflow-tracking")
S3_SECRET = os.environ.get("CHEST_CT_S3_SECRET", "s3-credentials")
#: Retries of the ingest step (downloads): pod evictions and network blips on the cluster. ``make run``
#: sets 0, since kfp.local honours retries and a bad data_uri would otherwise fail only after minutes.
INGEST_RETRIES = int(os.environ.get("CHEST_CT_INGEST_RETRIES", "3"))
if INGEST_RETRIES < 0:
    raise ValueError(f"CHEST_CT_INGEST_RETRIES={INGEST_RETRIES}: expected 0 or more")
if GPU_COUNT < 0:
    raise ValueError(f"CHEST_CT_GPU_COUNT={GPU_COUNT}: expected 0 or more")
if GPU_NODE_SELECTOR and "=" not in GPU_NODE_SELECTOR:
    raise ValueError(f"CHEST_CT_GPU_NODE_SELECTOR={GPU_NODE_SELECTOR!r}: expected key=value, or empty for none")

#: (cpu request, cpu limit, memory request, memory limit) per step: train holds VGG16 and the cached features.
RESOURCES = {
    "ingest": ("1", "2", "2G", "4G"),
    "base-model": ("1", "2", "2G", "4G"),
    "train": ("4", "8", "16G", "24G"),
    "evaluate": ("2", "4", "8G", "12G"),
    "deploy": ("500m", "1", "1G", "2G"),
}
#: Secret keys exposed to every task under the same names.
SECRET_ENV = {
    MLFLOW_SECRET: ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    S3_SECRET: ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"),
}


def configure(
    task: PipelineTask, step: str, *, gpu: bool = False, cache: bool = True, retries: int = 0
) -> PipelineTask:
    """Resources, GPU scheduling, caching, retries and credentials (from Secrets) for one task."""
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[step]
    task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory_request).set_memory_limit(memory_limit)
    task.set_caching_options(cache)
    if retries:
        task.set_retry(retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")
    if gpu and GPU_COUNT:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(GPU_COUNT)
        if GPU_NODE_SELECTOR:
            key, _, value = GPU_NODE_SELECTOR.partition("=")
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if GPU_TOLERATION_KEY:
            kubernetes.add_toleration(task, key=GPU_TOLERATION_KEY, operator="Exists", effect="NoSchedule")
        # The step checks TensorFlow sees them, rather than silently training on CPU (chest_ct/devices.py).
        task.set_env_variable(EXPECTED_GPUS_ENV, str(GPU_COUNT))
    for secret, keys in SECRET_ENV.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})
    return task
