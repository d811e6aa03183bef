"""The complete pod KServe and Knative create for an InferenceService, container by container.

Ported from the sources of the versions Kubeflow 1.10/1.11 ship:
- KServe's pod mutating webhook (pkg/webhook/admission/pod/
  storage_initializer_injector.go, v0.14.1 to v0.16.0): for a custom
  predictor whose ``kserve-container`` has ``STORAGE_URI``, an init container
  ``storage-initializer`` built from the ``storageInitializer`` entry of the
  ``inferenceservice-config`` ConfigMap (image, resources, args
  ``[<uri>, /mnt/models]``; no securityContext), then strategic-merged with the
  first enabled ClusterStorageContainer whose ``supportedUriFormats`` match the
  URI (``mergeContainerSpecs``); an emptyDir ``kserve-provision-location``
  mounted read-only on /mnt/models in ``kserve-container``, whose STORAGE_URI
  then reads /mnt/models; S3 credentials from the service account's Secrets
  as env vars. Which ClusterStorageContainer
  matches first is the order of a cached List, which is not sorted, so only
  a cluster with one matching container is predictable.
- Knative Serving v1.16.2 (Kubeflow 1.10.x/1.11.0; pkg/reconciler/revision/
  resources/deploy.go and queue.go), Knative mode only: the user container
  gets ``user-port``, PORT/K_* env, a preStop hook on queue-proxy and loses
  its readinessProbe (queue-proxy runs it); the ``queue-proxy`` container is
  added with ``queueSecurityContext`` (no privilege escalation, read-only
  root, runAsNonRoot, drop ALL, RuntimeDefault seccomp).
- KServe's metrics aggregator (metrics_aggregate_injector.go): port 9088 and
  env on queue-proxy, prometheus.io annotations on the pod.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tests.platforms.kserve import Release

#: KServe's own default ClusterStorageContainer (kserve config/storagecontainers/default.yaml; the same in the
#: kserve-cluster-resources.yaml of kubeflow/manifests v1.10.0, v1.10.2, v1.11.0 with the release's image).
DEFAULT_URI_FORMATS = [{"prefix": p} for p in ("gs://", "s3://", "hdfs://", "hf://", "webhdfs://")] + [
    {"regex": r"https://(.+?).blob.core.windows.net/(.+)"},
    {"regex": r"https://(.+?).file.core.windows.net/(.+)"},
    {"regex": r"https?://(.+)/(.+)"},
]
_RESOURCES = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "100Mi"}}


def kserve_default_storage_container(version: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterStorageContainer",
        "metadata": {"name": "default"},
        "spec": {
            "container": {
                "image": f"kserve/storage-initializer:v{version}",
                "name": "storage-initializer",
                "resources": copy.deepcopy(_RESOURCES),
            },
            "supportedUriFormats": copy.deepcopy(DEFAULT_URI_FORMATS),
            "workloadType": "initContainer",
        },
    }


def _supports(spec: Mapping[str, Any], uri: str) -> bool:
    for fmt in spec.get("supportedUriFormats") or []:
        if fmt.get("prefix") and uri.startswith(fmt["prefix"]):
            return True
        if fmt.get("regex") and re.match(fmt["regex"], uri):
            return True
    return False


def _strategic_merge(base: Any, override: Any, key: str = "") -> Any:
    """The parts of a strategic merge patch a Container needs: maps merge, env/volumeMounts merge by key."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for k, v in override.items():
            merged[k] = _strategic_merge(merged.get(k), v, k) if k in merged else copy.deepcopy(v)
        return merged
    merge_keys = {"env": "name", "volumeMounts": "mountPath", "ports": "containerPort"}
    if isinstance(base, list) and isinstance(override, list) and key in merge_keys:
        by_key = {item[merge_keys[key]]: item for item in base}
        for item in override:
            by_key[item[merge_keys[key]]] = _strategic_merge(by_key.get(item[merge_keys[key]]), item)
        return list(by_key.values())
    return copy.deepcopy(override)


def _storage_initializer(
    uri: str, release: Release, storage_containers: Sequence[Mapping[str, Any]], s3_secret: str | None
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "storage-initializer",
        "image": f"kserve/storage-initializer:v{release.version}",
        "args": [uri, "/mnt/models"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}],
        "resources": copy.deepcopy(_RESOURCES),
    }
    if s3_secret and uri.startswith("s3://"):  # credentials/s3: keys from the service account's Secret
        container["env"] = [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": name}}}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    for csc in storage_containers:
        spec = csc.get("spec") or {}
        if spec.get("disabled") or spec.get("workloadType", "initContainer") != "initContainer":
            continue
        if _supports(spec, uri):
            merged = _strategic_merge(container, spec["container"])
            merged["name"] = merged.get("name") or "storage-initializer"
            return merged
    return container


def _queue_proxy(container_concurrency: int) -> dict[str, Any]:
    return {
        "name": "queue-proxy",
        "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:" + "0" * 64,
        "ports": [
            {"name": "http-queueadm", "containerPort": 8022},
            {"name": "http-autometric", "containerPort": 9090},
            {"name": "http-usermetric", "containerPort": 9091},
            {"name": "queue-port", "containerPort": 8012},
            {"name": "https-port", "containerPort": 8112},
        ],
        "env": [{"name": "CONTAINER_CONCURRENCY", "value": str(container_concurrency)}],
        "readinessProbe": {
            "httpGet": {"port": 8012, "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}]},
            "periodSeconds": 1,
        },
        "resources": {"requests": {"cpu": "25m"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


#: KServe's ComponentExtensionSpec (pkg/apis/serving/v1beta1/component.go): the predictor's fields that
#: configure the component and never reach the pod. 0.14.1 has the first twelve; 0.15.0 to 0.16.0 add
#: scaleMetricType and autoScaling (the union is kept here; which fields a version knows is not a pod question).
COMPONENT_EXTENSION_FIELDS = frozenset(
    {
        "minReplicas",
        "maxReplicas",
        "scaleTarget",
        "scaleMetric",
        "containerConcurrency",
        "timeout",
        "canaryTrafficPercent",
        "logger",
        "batcher",
        "labels",
        "annotations",
        "deploymentStrategy",
        "scaleMetricType",
        "autoScaling",
    }
)


def serving_pod(
    obj: Mapping[str, Any],
    release: Release,
    storage_containers: Sequence[Mapping[str, Any]],
    service_accounts: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(pod spec, pod annotations) of one predictor replica of ``obj`` on ``release``."""
    predictor = copy.deepcopy(obj["spec"]["predictor"])
    mode = release.deployment_mode(dict(obj))
    annotations = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items()}
    annotations.update(predictor.pop("annotations", {}) or {})
    pod = {k: v for k, v in predictor.items() if k not in COMPONENT_EXTENSION_FIELDS}
    [user] = [c for c in pod["containers"] if c["name"] == "kserve-container"]
    uri = next((e["value"] for e in user.get("env") or [] if e["name"] == "STORAGE_URI"), None)

    if release.is_knative(mode):  # Knative revision -> Deployment pod template
        user["ports"] = [
            {"name": "user-port", "containerPort": (user.get("ports") or [{}])[0].get("containerPort", 8080)}
        ]
        user["env"] = [
            *user.get("env", []),
            {"name": "PORT", "value": str(user["ports"][0]["containerPort"])},
            {"name": "K_REVISION", "value": f"{obj['metadata']['name']}-predictor-00001"},
            {"name": "K_CONFIGURATION", "value": f"{obj['metadata']['name']}-predictor"},
            {"name": "K_SERVICE", "value": f"{obj['metadata']['name']}-predictor"},
        ]
        user["lifecycle"] = {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022}}}
        user.pop("readinessProbe", None)
        user.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
        pod["containers"] = [*pod["containers"], _queue_proxy(predictor.get("containerConcurrency", 0))]
        pod["enableServiceLinks"] = False
        pod["terminationGracePeriodSeconds"] = predictor.get("timeout", 300)
        if annotations.get("serving.kserve.io/enable-metric-aggregation") == "true":
            queue = pod["containers"][-1]
            queue["ports"].append({"name": "aggr-metric", "containerPort": 9088, "protocol": "TCP"})
        if annotations.get("serving.kserve.io/enable-prometheus-scraping") == "true":
            annotations.update(
                {
                    "prometheus.io/port": "9088"
                    if annotations.get("serving.kserve.io/enable-metric-aggregation") == "true"
                    else "9091",
                    "prometheus.io/path": "/metrics",
                }
            )

    if uri:  # the pod webhook
        account = (service_accounts or {}).get(pod.get("serviceAccountName", "default"), {})
        s3_secret = next((s["name"] for s in account.get("secrets") or []), None)
        pod["initContainers"] = [
            *pod.get("initContainers", []),
            _storage_initializer(uri, release, storage_containers, s3_secret),
        ]
        pod["volumes"] = [*pod.get("volumes", []), {"name": "kserve-provision-location", "emptyDir": {}}]
        user["volumeMounts"] = [
            *user.get("volumeMounts", []),
            {"name": "kserve-provision-location", "mountPath": "/mnt/models", "readOnly": True},
        ]
        for env in user.get("env") or []:  # the server reads the local copy
            if env["name"] == "STORAGE_URI":
                env["value"] = "/mnt/models"
        annotations["internal.serving.kserve.io/storage-initializer-sourceuri"] = uri
    return pod, annotations


#: Knative v1.16.2 pkg/apis/serving/fieldmask.go, default config-features (emptyDir enabled,
#: pod-level securityContext, init containers and the rest disabled).
_KNATIVE_CONTAINER_FIELDS = {
    "name",
    "args",
    "command",
    "env",
    "workingDir",
    "envFrom",
    "image",
    "imagePullPolicy",
    "livenessProbe",
    "ports",
    "readinessProbe",
    "resources",
    "securityContext",
    "startupProbe",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "volumeMounts",
}
_KNATIVE_SECURITY_FIELDS = {
    "capabilities",
    "readOnlyRootFilesystem",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "allowPrivilegeEscalation",
    "seccompProfile",
}
_KNATIVE_POD_FIELDS = {
    "serviceAccountName",
    "containers",
    "volumes",
    "imagePullSecrets",
    "enableServiceLinks",
    "automountServiceAccountToken",
}
_KNATIVE_VOLUME_SOURCES = {"secret", "configMap", "projected", "emptyDir"}


def knative_refusals(predictor: Mapping[str, Any]) -> list[str]:
    """What Knative's webhook refuses in the revision KServe derives from ``predictor`` (empty: accepted)."""
    refusals = [
        f"must not set the field(s): {key}"
        for key in predictor
        if key not in _KNATIVE_POD_FIELDS | COMPONENT_EXTENSION_FIELDS
    ]
    for container in predictor.get("containers") or []:
        name = container.get("name")
        refusals += [f"{name}: must not set the field(s): {k}" for k in container if k not in _KNATIVE_CONTAINER_FIELDS]
        refusals += [
            f"{name}: must not set the field(s): securityContext.{k}"
            for k in container.get("securityContext") or {}
            if k not in _KNATIVE_SECURITY_FIELDS
        ]
        ports = container.get("ports") or []
        if len(ports) > 1:
            refusals.append(f"{name}: more than one container port is set")
        if ports and ports[0].get("name", "") not in ("", "h2c", "http1"):
            refusals.append(f"{name}: Port name {ports[0]['name']} is not allowed (must be empty, h2c or http1)")
        if ports and ports[0].get("protocol", "TCP") != "TCP":
            refusals.append(f"{name}: invalid value: {ports[0]['protocol']}: protocol")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = ((container.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and ports and port != ports[0].get("name"):
                refusals.append(f"{name}: {probe}.httpGet.port: Probe port must match container port")
    for volume in predictor.get("volumes") or []:
        sources = set(volume) - {"name"}
        if not sources <= _KNATIVE_VOLUME_SOURCES:
            refusals.append(f"volume {volume['name']}: must not set the field(s): {', '.join(sorted(sources))}")
    return refusals
