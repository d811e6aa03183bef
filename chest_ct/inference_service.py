"""The KServe InferenceService that serves a chest-ct SavedModel.

One function builds it, for the pipeline's deploy step and for people
(``python -m chest_ct.deploy render``), so there is no hand-kept YAML copy to
drift. What it encodes, each from the platform's source:

- a custom predictor speaking the Open Inference Protocol: KServe reads
  ``PROTOCOL=v2`` and ``STORAGE_URI`` from the container named
  ``kserve-container`` and has its storage initializer download the model
  into /mnt/models before the server starts;
- the deployment-mode annotation under the name the target KServe knows:
  ``Serverless``/``RawDeployment`` before 0.16, ``Knative``/``Standard`` from
  0.16 (0.14-0.15.x ignore the new names and fall back to the cluster
  default; 0.16 maps the old ones to the new and records those);
- a securityContext that meets the "restricted" Pod Security profile,
  set per container (Knative refuses pod-level fields unless enabled);
- autoscaling sized for a CPU-bound model (see :class:`Autoscaling`);
- readiness on ``/v2/models/<name>/ready``: true only once the model is loaded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
#: KServe treats only the container with this name as the model server.
PREDICTOR_CONTAINER = "kserve-container"
#: Where KServe's storage initializer puts the files behind STORAGE_URI.
MODEL_MOUNT = "/mnt/models"
HTTP_PORT = 8080
GRPC_PORT = 8081
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"

DEFAULT_NAME = "chest-ct"
DEFAULT_MODEL_NAME = "chest-ct"
DEFAULT_NAMESPACE = "chest-ct"
#: The serving image (Dockerfile.serve). The one place this default lives: the pipeline signature reads it.
DEFAULT_IMAGE = "ghcr.io/chest-ct/chest-ct-serve:0.1.0"
DEFAULT_SERVICE_ACCOUNT = "chest-ct-model-server"
#: KServe release the objects are written for when the caller does not say (Kubeflow 1.11 ships 0.15.2).
DEFAULT_KSERVE_VERSION = "0.15"
#: UID/GID of the image's user (Dockerfile.serve).
SERVER_UID = 10001
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "3Gi"},
}

#: "Knative" allows canary traffic splits but routes one port (HTTP);
#: "Standard" (plain Deployment) routes HTTP and gRPC but has no canary split.
DeploymentMode = Literal["Knative", "Standard"]
DEPLOYMENT_MODES: tuple[str, ...] = ("Knative", "Standard")
_MODE_NAMES = {  # (before KServe 0.16, from 0.16)
    "Knative": ("Serverless", "Knative"),
    "Standard": ("RawDeployment", "Standard"),
}
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_STORAGE_URI = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


def pod_admits() -> int:
    """One-image requests a model-server pod admits at its default limits (running call plus queue).

    Read from the server's own configuration, so Knative's hard limit cannot drift from it.
    """
    from serving.config import ServerConfig

    limits = ServerConfig()
    return limits.max_batch_size + limits.max_queued_images


@dataclass(frozen=True)
class Autoscaling:
    """Knative autoscaling for one pod of 2 CPUs running the 224 px VGG16 model.

    Derived from the server's own admission limits and bench/serve.py on 2 cores
    (docs/benchmarks.md): one pod peaks at about 7 images/s, so a request in
    flight beyond what the pod admits only waits.

    - ``container_concurrency``: what the server admits, ``max_batch_size +
      max_queued_images`` one-image requests (serving/config.py, 4 by default).
      Knative's queue-proxy holds the excess (and the activator buffers it while
      a new pod starts) instead of the server answering 503 to it.
    - ``scale_metric = "concurrency"``, ``scale_target`` = the same number: with
      Knative's default 70% target utilisation a new pod is requested from about
      3 requests in flight per pod, early enough to cover a pod's start (model
      download plus ~5 s to ready). Requests per second would miscount requests
      carrying several images.
    - ``timeout_seconds = 60``: the longest legitimate request (64 images,
      the server's cap, about 9 s) queued behind a full pod.
    Knative's default (100 concurrent, no limit) never scales this model out.
    """

    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: Literal["concurrency", "rps"] = "concurrency"
    scale_target: int = field(default_factory=lambda: pod_admits())
    container_concurrency: int = field(default_factory=lambda: pod_admits())
    timeout_seconds: int = 60

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"min_replicas/max_replicas: expected 0 <= min <= max and max >= 1, "
                f"got {self.min_replicas}, {self.max_replicas}"
            )
        if self.scale_metric not in ("concurrency", "rps"):  # what KServe's webhook allows for Knative (KPA)
            raise ValueError(f"scale_metric: expected concurrency or rps, got {self.scale_metric!r}")
        if self.scale_target < 1 or self.container_concurrency < 0 or self.timeout_seconds < 1:
            raise ValueError(f"scale_target, container_concurrency, timeout_seconds: out of range ({self})")
        if self.container_concurrency and self.scale_target > self.container_concurrency:
            raise ValueError(
                f"scale_target {self.scale_target} is over container_concurrency "
                f"{self.container_concurrency}: Knative could never reach it"
            )


def kserve_release(version: str) -> tuple[int, int]:
    """``"0.15.2"`` -> ``(0, 15)``; refuses what is not a KServe version."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(\.\d+)?", (version or "").strip())
    if not match:
        raise ValueError(f"kserve_version: expected a KServe release such as 0.15 or 0.16.0, got {version!r}")
    return int(match.group(1)), int(match.group(2))


def mode_annotation(mode: str, kserve_version: str) -> str:
    """The value of ``serving.kserve.io/deploymentMode`` that ``kserve_version`` reads as ``mode``."""
    if mode not in _MODE_NAMES:
        raise ValueError(f"deployment_mode: expected one of {', '.join(DEPLOYMENT_MODES)}, got {mode!r}")
    legacy, current = _MODE_NAMES[mode]
    return legacy if kserve_release(kserve_version) < (0, 16) else current


def mode_of(name: str | None) -> str | None:
    """``Knative``/``Standard`` for any spelling KServe records, None for others (ModelMesh) or none."""
    for mode, names in _MODE_NAMES.items():
        if name in names:
            return mode
    return None


def inference_service(
    storage_uri: str,
    *,
    name: str = DEFAULT_NAME,
    namespace: str | None = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    deployment_mode: DeploymentMode = "Knative",
    kserve_version: str = DEFAULT_KSERVE_VERSION,
    canary_traffic_percent: int | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    autoscaling: Autoscaling = Autoscaling(),
    resources: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The v1beta1 InferenceService serving ``storage_uri`` with the chest-ct image."""
    _check_dns_label("name", name)
    if namespace is not None:
        _check_dns_label("namespace", namespace)
    _check_dns_label("service_account", service_account)
    _check_dns_label("model_name", model_name)
    _check_image("image", image)
    if not _STORAGE_URI.match(storage_uri or ""):
        raise ValueError(f"storage_uri: expected a URI such as s3://bucket/prefix, got {storage_uri!r}")
    annotation = mode_annotation(deployment_mode, kserve_version)
    check_percent(canary_traffic_percent)
    if canary_traffic_percent is not None and deployment_mode != "Knative":
        raise ValueError(
            "canary_traffic_percent: KServe splits traffic between revisions only in Knative mode; "
            f"in {deployment_mode} mode the field is silently ignored, so it is refused here"
        )
    knative = deployment_mode == "Knative"
    # Knative routes exactly one port, named http1 (or h2c); Standard mode exposes
    # each declared port and treats the one named h2c as gRPC.
    ports: list[dict[str, Any]] = [
        {"name": "http1" if knative else "http", "containerPort": HTTP_PORT, "protocol": "TCP"}
    ]
    if not knative:
        ports.append({"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"})

    container: dict[str, Any] = {
        "name": PREDICTOR_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [f"--model_name={model_name}", f"--model_dir={MODEL_MOUNT}"],
        "env": [
            {"name": "STORAGE_URI", "value": storage_uri},
            {"name": "PROTOCOL", "value": "v2"},
            {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only; caches go to the emptyDir
        ],
        "ports": ports,
        # Ready only once the model answers (the server health route is up before that).
        "readinessProbe": _http_probe(f"/v2/models/{model_name}/ready", initial_delay=5, period=10, failures=3),
        "livenessProbe": _http_probe("/v2/health/live", initial_delay=30, period=15, failures=4),
        "resources": copy.deepcopy({k: dict(v) for k, v in (resources or DEFAULT_RESOURCES).items()}),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVER_UID,
            "runAsGroup": SERVER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": service_account,
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "timeout": autoscaling.timeout_seconds,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    annotations = {DEPLOYMENT_MODE_ANNOTATION: annotation}
    if knative:
        predictor.update(
            scaleMetric=autoscaling.scale_metric,
            scaleTarget=autoscaling.scale_target,
            containerConcurrency=autoscaling.container_concurrency,
        )
        # KServe's pod webhook points Prometheus at queue-proxy, which merges its own
        # metrics with the server's /metrics (metrics_aggregate_injector.go).
        annotations.update(
            {
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "serving.kserve.io/enable-metric-aggregation": "true",
            }
        )
    else:
        predictor["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(HTTP_PORT),
            "prometheus.io/path": "/metrics",
        }
    if canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = canary_traffic_percent

    metadata: dict[str, Any] = {"name": name, "annotations": annotations}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": {"predictor": predictor}}


def storage_uri_of(obj: Mapping[str, Any]) -> str | None:
    """The STORAGE_URI the predictor container serves, or None."""
    for container in ((obj.get("spec") or {}).get("predictor") or {}).get("containers") or []:
        if container.get("name") == PREDICTOR_CONTAINER:
            return next((e.get("value") for e in container.get("env") or [] if e.get("name") == "STORAGE_URI"), None)
    return None


def check_percent(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100):
        raise ValueError(f"canary_traffic_percent: expected an integer from 0 to 100 or None, got {value!r}")


def _http_probe(path: str, *, initial_delay: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": HTTP_PORT},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _check_dns_label(field: str, value: str) -> None:
    if not (isinstance(value, str) and len(value) <= 63 and _DNS_LABEL.match(value)):
        raise ValueError(
            f"{field}: expected a DNS label (lowercase letters, digits and '-', starting with a letter, "
            f"at most 63 characters), got {value!r}"
        )


def _check_image(field: str, image: str) -> None:
    last = (image or "").rsplit("/", 1)[-1]
    if "@sha256:" in (image or ""):
        return
    if ":" not in last or last.endswith(":latest") or last.endswith(":"):
        raise ValueError(f"{field}: expected an image pinned by tag or digest (not :latest), got {image!r}")
