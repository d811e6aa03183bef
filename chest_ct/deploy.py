"""Publish a trained model: copy the SavedModel to S3 and point KServe at it.

Plain functions without KFP, so the pipeline's deploy step is a thin wrapper
and the same code is tested against a local S3 server and a local stand-in for
the Kubernetes API. ``inference_service()`` builds the same object as
``manifests/base/inferenceservice.yaml`` (the tests keep them identical), so a
model promoted by the pipeline and one applied by hand are served the same way.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kserve import KServeClient, V1beta1InferenceService
    from kubernetes.client import Configuration

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
#: KServe only treats the container with this name as the model server (storage
#: initializer, STORAGE_URI, PROTOCOL).
PREDICTOR_CONTAINER = "kserve-container"
#: Where KServe's storage initializer puts the files behind STORAGE_URI.
MODEL_MOUNT = "/mnt/models"
HTTP_PORT = 8080
GRPC_PORT = 8081
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"

DEFAULT_NAME = "chest-ct"
DEFAULT_NAMESPACE = "chest-ct"
DEFAULT_IMAGE = "ghcr.io/chest-ct/chest-ct-serve:0.1.0"
DEFAULT_STORAGE_URI = "s3://chest-ct-models/chest-ct/champion"
DEFAULT_SERVICE_ACCOUNT = "chest-ct-model-server"
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "3Gi"},
}

#: "Knative" allows canary traffic splits but only one routed port (HTTP);
#: "Standard" (plain Deployment) routes HTTP and gRPC but has no canary split.
DeploymentMode = Literal["Knative", "Standard"]
DEPLOYMENT_MODES: tuple[str, ...] = ("Knative", "Standard")
#: Names older KServe releases use for the same two modes.
_LEGACY_MODES = {"Serverless": "Knative", "RawDeployment": "Standard"}

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_STORAGE_URI = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_SAVED_MODEL_FILE = "saved_model.pb"


# --------------------------------------------------------------------------- S3


def parse_s3_uri(uri: str, *, field: str = "s3_uri") -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix (no trailing slash).

    A model always lives under a prefix: uploading to a bucket's root would mix
    its files with everything else in the bucket.
    """
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(.+)", uri or "")
    prefix = match.group(2).strip("/") if match else ""
    if not match or not prefix:
        raise ValueError(f"{field}: expected s3://<bucket>/<prefix>, got {uri!r}")
    return match.group(1), prefix


def upload_model_dir(
    model_dir: Path,
    s3_uri: str,
    endpoint_url: str | None = None,
    *,
    s3_client: Any = None,
) -> str:
    """Copy a SavedModel folder to ``s3_uri`` and return the URI to serve from.

    Use a fresh prefix per model version (e.g. the MLflow run id): KServe reads
    whatever is under the prefix, so files left there by another model would
    be served alongside this one. That is refused; uploading the same folder
    again (a retried pipeline step) is not.

    Credentials come from the usual boto3 sources (``AWS_ACCESS_KEY_ID``...);
    ``endpoint_url`` is for S3-compatible stores (MinIO, GCS interop) and
    empty means AWS itself.
    """
    model_dir = Path(model_dir)
    if not (model_dir / _SAVED_MODEL_FILE).is_file():
        raise ValueError(
            f"model_dir: expected a TensorFlow SavedModel folder containing {_SAVED_MODEL_FILE}, got {model_dir}"
        )
    bucket, prefix = parse_s3_uri(s3_uri)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    keys = {f"{prefix}/{p.relative_to(model_dir).as_posix()}": p for p in files}

    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3", endpoint_url=endpoint_url or None)
    foreign = sorted(set(_list_keys(s3_client, bucket, prefix + "/")) - set(keys))
    if foreign:
        raise ValueError(
            f"s3_uri: s3://{bucket}/{prefix} already holds files that are not in {model_dir} "
            f"(e.g. {foreign[0]!r}); upload each model version to its own prefix"
        )
    # saved_model.pb last: anything that polls for it sees a complete model.
    for key, path in sorted(keys.items(), key=lambda item: item[1].name == _SAVED_MODEL_FILE):
        s3_client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{prefix}"


def _list_keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    paginator = s3_client.get_paginator("list_objects_v2")
    return [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])]


# ------------------------------------------------------------ InferenceService


def inference_service(
    name: str = DEFAULT_NAME,
    namespace: str | None = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    storage_uri: str = DEFAULT_STORAGE_URI,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    canary_traffic_percent: int | None = None,
    *,
    deployment_mode: DeploymentMode = "Knative",
    model_name: str = "chest-ct",
    min_replicas: int = 1,
    max_replicas: int = 3,
    resources: Mapping[str, Mapping[str, str]] | None = None,
    run_as_user: int = 10001,
) -> dict[str, Any]:
    """The v1beta1 InferenceService serving ``storage_uri`` with the chest-ct image.

    A custom predictor speaking the Open Inference Protocol: KServe learns the
    protocol from ``PROTOCOL=v2`` and downloads the model from ``STORAGE_URI``
    into /mnt/models, both read from the ``kserve-container`` environment.
    ``canary_traffic_percent`` sends that share of traffic to this revision and
    the rest to the previous one (Knative mode only, where KServe implements it).
    """
    _check_dns_label("name", name)
    if namespace is not None:
        _check_dns_label("namespace", namespace)
    _check_dns_label("service_account", service_account)
    _check_image("image", image)
    if not _STORAGE_URI.match(storage_uri or ""):
        raise ValueError(f"storage_uri: expected a URI such as s3://bucket/prefix, got {storage_uri!r}")
    if deployment_mode not in DEPLOYMENT_MODES:
        raise ValueError(f"deployment_mode: expected one of {', '.join(DEPLOYMENT_MODES)}, got {deployment_mode!r}")
    _check_percent(canary_traffic_percent)
    if canary_traffic_percent is not None and deployment_mode != "Knative":
        raise ValueError(
            "canary_traffic_percent: KServe splits traffic between revisions only in Knative mode; "
            f"in {deployment_mode} mode the field is silently ignored, so it is refused here"
        )
    if not (isinstance(min_replicas, int) and isinstance(max_replicas, int) and 0 <= min_replicas <= max_replicas):
        raise ValueError(
            f"min_replicas/max_replicas: expected integers with 0 <= min <= max, got {min_replicas}, {max_replicas}"
        )

    # Knative routes exactly one port; Standard mode exposes each declared port
    # and marks the one named h2c as gRPC.
    ports: list[dict[str, Any]] = [
        {"name": "http1" if deployment_mode == "Knative" else "http", "containerPort": HTTP_PORT, "protocol": "TCP"}
    ]
    if deployment_mode == "Standard":
        ports.append({"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"})

    container: dict[str, Any] = {
        "name": PREDICTOR_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [f"--model_name={model_name}", f"--model_dir={MODEL_MOUNT}"],
        "env": [
            {"name": "STORAGE_URI", "value": storage_uri},
            {"name": "PROTOCOL", "value": "v2"},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": ports,
        "readinessProbe": _http_probe("/v2/health/ready", initial_delay=5, period=10, failures=3),
        "livenessProbe": _http_probe("/v2/health/live", initial_delay=30, period=15, failures=4),
        "resources": copy.deepcopy(dict(resources or DEFAULT_RESOURCES)),
        # Set on the container, not the pod: Knative rejects most pod-level
        # securityContext fields unless an operator enables them.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": run_as_user,
            "runAsGroup": run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": service_account,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    if canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = canary_traffic_percent

    metadata: dict[str, Any] = {"name": name, "annotations": {DEPLOYMENT_MODE_ANNOTATION: deployment_mode}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": {"predictor": predictor}}


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


def _check_percent(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100):
        raise ValueError(f"canary_traffic_percent: expected an integer from 0 to 100 or None, got {value!r}")


# ------------------------------------------------------ KServe SDK model check


def to_inference_service_model(obj: Mapping[str, Any]) -> V1beta1InferenceService:
    """Convert an InferenceService dict into the KServe SDK's model, strictly.

    The SDK's own deserializer silently drops fields it does not know and
    cannot resolve the Kubernetes types (V1Container...) nested in KServe's, so
    a typo such as ``canaryTraficPercent`` would vanish instead of failing.
    This walks the SDK's type declarations and names the first field that is
    unknown or of the wrong type.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"inference service: expected a mapping, got {type(obj).__name__}")
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise ValueError(
            f"apiVersion/kind: expected {API_VERSION} {KIND}, got {obj.get('apiVersion')!r} {obj.get('kind')!r}"
        )
    if not (obj.get("spec") or {}).get("predictor"):
        raise ValueError("spec.predictor: required, missing")
    return _to_model(dict(obj), "V1beta1InferenceService", "")


# SDK primitive type names -> accepted JSON types. KServe's ResourceQuantity, like a
# Kubernetes quantity, may be written as a number or a string.
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "ResourceQuantity": (str, int, float),
}


def _to_model(value: Any, type_name: str, path: str) -> Any:
    where = path or "<root>"
    if value is None:
        return None
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        inner = type_name[len("list[") : -1]
        return [_to_model(item, inner, f"{path}[{i}]") for i, item in enumerate(value)]
    if type_name.startswith("dict("):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return {key: _to_model(item, inner, f"{path}.{key}" if path else key) for key, item in value.items()}
    if type_name == "object":
        return value
    if type_name in _PRIMITIVES:
        allowed = _PRIMITIVES[type_name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value

    model_class = _sdk_class(type_name)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a {type_name} mapping, got {type(value).__name__}")
    attribute_by_key = {key: attribute for attribute, key in model_class.attribute_map.items()}
    unknown = sorted(set(value) - set(attribute_by_key))
    if unknown:
        raise ValueError(
            f"{where}: unknown field {unknown[0]!r} for {type_name} (known: {', '.join(sorted(attribute_by_key))})"
        )
    kwargs = {
        attribute_by_key[key]: _to_model(
            item, model_class.openapi_types[attribute_by_key[key]], f"{path}.{key}" if path else key
        )
        for key, item in value.items()
    }
    try:
        return model_class(**kwargs)
    except (TypeError, ValueError) as err:  # the SDK's own required-field checks
        raise ValueError(f"{where}: {err}") from err


def _sdk_class(type_name: str) -> type:
    import kserve.models
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        model_class = getattr(module, type_name, None)
        if model_class is not None:
            return model_class
    raise TypeError(f"no KServe or Kubernetes SDK model named {type_name}")


# ------------------------------------------------------------------- applying


def kserve_client(configuration: Configuration | None = None) -> KServeClient:
    """A KServe client; in-cluster/kubeconfig credentials unless ``configuration`` is given.

    ``KServeClient(client_configuration=...)`` fills that configuration but
    still builds its API objects from the process-wide default after loading
    a kubeconfig, so a client for a specific API server (another cluster, a
    test server) gets its API objects set here instead of by ``__init__``.
    """
    from kserve import KServeClient

    if configuration is None:
        return KServeClient()
    from kubernetes import client as k8s

    api_client = k8s.ApiClient(configuration)
    bound = KServeClient.__new__(KServeClient)
    bound.core_api = k8s.CoreV1Api(api_client)
    bound.app_api = k8s.AppsV1Api(api_client)
    bound.api_instance = k8s.CustomObjectsApi(api_client)
    bound.hpa_v2_api = k8s.AutoscalingV2Api(api_client)
    return bound


def apply_inference_service(
    obj: Mapping[str, Any], namespace: str, *, client: KServeClient | None = None
) -> dict[str, Any]:
    """Create the InferenceService, or merge-patch it if it exists; return the server's copy.

    - On create, ``canaryTrafficPercent`` is dropped: there is no earlier
      revision to send the rest of the traffic to.
    - On patch without a canary, a canary left by the previous rollout is
      promoted (100%): a merge patch would otherwise keep the old percentage
      and send most traffic to the previous model.
    - The deployment mode cannot change in place (KServe refuses), which is
      reported here with the fix rather than as an admission error.
    """
    _check_dns_label("namespace", namespace)
    body = copy.deepcopy(dict(obj))
    metadata = body.setdefault("metadata", {})
    if metadata.get("namespace") not in (None, namespace):
        raise ValueError(f"metadata.namespace: {metadata['namespace']!r} does not match namespace {namespace!r}")
    metadata["namespace"] = namespace
    name = metadata.get("name", "")
    _check_dns_label("metadata.name", name)
    to_inference_service_model(body)  # fail on a malformed object before talking to the cluster

    client = client or kserve_client()
    existing = _get_or_none(client, name, namespace)
    predictor = body["spec"]["predictor"]
    if existing is None:
        predictor.pop("canaryTrafficPercent", None)
        return client.create(to_inference_service_model(body), namespace=namespace)

    wanted_mode = _mode_of(body)
    current_mode = _mode_of(existing)
    if wanted_mode and current_mode and wanted_mode != current_mode:
        raise ValueError(
            f"deployment_mode: {namespace}/{name} runs in {current_mode} mode and KServe cannot switch it to "
            f"{wanted_mode} in place; delete the InferenceService first or keep {current_mode}"
        )
    previous_canary = ((existing.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
    if "canaryTrafficPercent" not in predictor and previous_canary is not None:
        predictor["canaryTrafficPercent"] = 100
    return client.patch(name, to_inference_service_model(body), namespace=namespace)


def _get_or_none(client: KServeClient, name: str, namespace: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    try:
        return client.get(name, namespace=namespace)
    except RuntimeError as err:  # KServeClient wraps the ApiException it caught
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ApiException) and cause.status == 404:
            return None
        raise


def _mode_of(obj: Mapping[str, Any]) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(DEPLOYMENT_MODE_ANNOTATION) or (obj.get("status") or {}).get("deploymentMode")
    return _LEGACY_MODES.get(mode, mode) if mode else None
