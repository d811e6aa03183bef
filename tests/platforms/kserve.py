"""KServe's rules for an InferenceService, per release: schema, admission webhook, controller.

Sources (kserve/kserve at each tag):
- schema: the v1beta1 API types. The CRD's openAPIV3Schema is generated from
  them, and the Python SDK's models (``kserve/models/v1beta1_*.py`` in the
  release's wheel on PyPI) carry the same field names and types; compared with
  the CRDs shipped in kubeflow/manifests v1.10.0/v1.10.2/v1.11.0 and
  kserve v0.16.0 ``config/crd/full``, the predictor's fields agree except
  ``ephemeralContainers``, which the SDK has and the CRD drops (excluded
  here). Kubernetes types nested inside are checked with the kubernetes
  client's models. The API server refuses unknown fields with
  ``fieldValidation=Strict`` and drops them (with a warning) otherwise.
- admission: ``pkg/apis/serving/v1beta1/inference_service_validation.go``
  (name format, replicas, containerConcurrency, KPA metrics, and from 0.15.1
  the deployment-mode rule: an update whose annotation differs from
  ``status.deploymentMode`` is rejected).
- controller: ``pkg/controller/v1beta1/inferenceservice/utils/utils.go``
  ``GetDeploymentMode`` (0.14-0.15.x know ``Serverless``/``RawDeployment``
  only and fall back to the cluster default for anything else; 0.15.1+
  records the mode in the status and prefers it; 0.16 maps the legacy names
  to ``Knative``/``Standard``), the Knative traffic split of
  ``reconcilers/knative/ksvc_reconciler.go`` and the rollout bookkeeping of
  ``inference_service_status.go`` ``PropagateStatus``.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client.models as k8s_models

from tests.platforms.archives import archive, members

RELEASES = ("0.14.1", "0.15.0", "0.15.2", "0.16.0")
_ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # IsvcNameFmt
_SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}  # CRD enum of spec.predictor.scaleMetric


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class Invalid(Exception):
    """What the API server answers 422 for (schema) or the webhook denies (admission)."""

    def __init__(self, message: str, *, webhook: bool = False):
        super().__init__(message)
        self.message, self.webhook = message, webhook


@functools.cache
def sdk_models(version: str) -> dict[str, dict[str, dict[str, str]]]:
    """Class name -> {"attribute_map": ..., "openapi_types": ...} of the release's SDK models."""
    models: dict[str, dict[str, dict[str, str]]] = {}
    for source in members(archive("kserve", version), "kserve/models/").values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                tables = {
                    st.targets[0].id: ast.literal_eval(st.value)
                    for st in node.body
                    if isinstance(st, ast.Assign)
                    and isinstance(st.targets[0], ast.Name)
                    and st.targets[0].id in ("attribute_map", "openapi_types")
                }
                if len(tables) == 2:
                    models[node.name] = tables
    return models


@dataclass
class Release:
    """One KServe release's behaviour."""

    version: str
    default_mode: str = ""  # inferenceservice-config "deploy.defaultDeploymentMode"; Kubeflow ships Serverless

    def __post_init__(self) -> None:
        if not self.default_mode:
            self.default_mode = "Knative" if self.new_mode_names else "Serverless"

    @property
    def records_mode(self) -> bool:
        return version_tuple(self.version) >= (0, 15, 1)

    @property
    def new_mode_names(self) -> bool:
        return version_tuple(self.version) >= (0, 16)

    # ------------------------------------------------------------ schema

    def unknown_fields(self, obj: dict[str, Any]) -> list[str]:
        """Paths of fields the CRD schema does not know; raises Invalid on a wrong type."""
        unknown: list[str] = []
        for key, value in obj.items():
            if key in ("apiVersion", "kind"):
                if not isinstance(value, str):
                    raise Invalid(f"{key}: must be a string")
            elif key == "metadata":
                self._walk(value, "V1ObjectMeta", "metadata", unknown)
            elif key == "spec":
                self._walk(value, "V1beta1InferenceServiceSpec", "spec", unknown)
            elif key == "status":
                pass  # a subresource: ignored on writes to the object
            else:
                unknown.append(key)
        predictor = (obj.get("spec") or {}).get("predictor") or {}
        metric = predictor.get("scaleMetric")
        if metric is not None and metric not in _SCALE_METRICS:
            raise Invalid(
                f'spec.predictor.scaleMetric: Unsupported value: "{metric}": supported values: '
                + ", ".join(f'"{m}"' for m in sorted(_SCALE_METRICS))
            )
        return unknown

    def unknown_fields_of(self, obj: dict[str, Any], type_name: str) -> list[str]:
        """Unknown field paths of ``obj`` read as the release's API type ``type_name``."""
        unknown: list[str] = []
        self._walk(obj, type_name, "", unknown)
        return unknown

    def prune(self, obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        pruned = copy.deepcopy(obj)
        for path in paths:
            parts = re.split(r"\.(?![^\[]*\])", path)
            node: Any = pruned
            for part in parts[:-1]:
                name, _, index = part.partition("[")
                node = node[name]
                if index:
                    node = node[int(index.rstrip("]"))]
            node.pop(parts[-1], None)
        return pruned

    def _walk(self, value: Any, type_name: str, path: str, unknown: list[str]) -> None:
        if value is None:
            return
        if type_name.startswith("list["):
            self._expect(value, list, path, "array")
            for i, item in enumerate(value):
                self._walk(item, type_name[5:-1], f"{path}[{i}]", unknown)
            return
        if type_name.startswith("dict("):
            self._expect(value, dict, path, "object")
            inner = type_name[type_name.index(",") + 1 : -1].strip()
            quantity = path.endswith((".limits", ".requests")) or inner == "ResourceQuantity"
            for key, item in value.items():
                self._walk(item, "quantity" if quantity else inner, _join(path, key), unknown)
            return
        primitive = {
            "str": (str,),
            "int": (int,),
            "float": (int, float),
            "bool": (bool,),
            "datetime": (str,),
            "date": (str,),
            "object": (object,),
            "quantity": (str, int, float),
            "ResourceQuantity": (str, int, float),
        }
        if type_name in primitive:
            allowed = primitive[type_name]
            if not isinstance(value, allowed) or (
                isinstance(value, bool) and bool not in allowed and object not in allowed
            ):
                json_type = {"str": "string", "int": "integer", "bool": "boolean"}.get(type_name, type_name)
                raise Invalid(
                    f'{path}: Invalid value: "{type(value).__name__}": {path} in body must be of type '
                    f"{json_type}: {json.dumps(value)}"
                )
            return
        attribute_map, types = self._model(type_name)
        self._expect(value, dict, path, "object")
        by_key = {key: attr for attr, key in attribute_map.items()}
        for key, item in value.items():
            if key not in by_key or (type_name == "V1beta1PredictorSpec" and key == "ephemeralContainers"):
                unknown.append(_join(path, key))
            else:
                self._walk(item, types[by_key[key]], _join(path, key), unknown)

    def _model(self, type_name: str) -> tuple[dict[str, str], dict[str, str]]:
        kserve = sdk_models(self.version).get(type_name)
        if kserve:
            return kserve["attribute_map"], kserve["openapi_types"]
        name = re.sub(r"^K8sIoApi\w+?V1", "V1", type_name)
        model = getattr(k8s_models, name)
        return model.attribute_map, model.openapi_types

    @staticmethod
    def _expect(value: Any, kind: type, path: str, json_type: str) -> None:
        if not isinstance(value, kind):
            raise Invalid(
                f'{path}: Invalid value: "{type(value).__name__}": {path} in body must be of type {json_type}'
            )

    # ------------------------------------------------------------ admission

    def admit(self, new: dict[str, Any], old: dict[str, Any] | None) -> None:
        """The validating webhook (ValidateCreate / ValidateUpdate)."""
        name = new["metadata"]["name"]
        annotations = new["metadata"].get("annotations") or {}
        if old is not None and self.records_mode:
            recorded = (old.get("status") or {}).get("deploymentMode")
            wanted = annotations.get("serving.kserve.io/deploymentMode")
            if recorded and wanted is not None and wanted != recorded:
                raise Invalid(
                    f"update rejected: deploymentMode cannot be changed from '{recorded}' to '{wanted}'", webhook=True
                )
        if not _ISVC_NAME.match(name):
            raise Invalid(
                f'The InferenceService "{name}" is invalid: a InferenceService name must consist of '
                "lower case alphanumeric characters or '-', and must start with alphabetical character",
                webhook=True,
            )
        predictor = new["spec"].get("predictor") or {}
        if (predictor.get("containerConcurrency") or 0) < 0:
            raise Invalid("the lower bound for containerConcurrency is 0", webhook=True)
        low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
        if low < 0 or high < 0 or (low > high and high != 0):
            raise Invalid("minReplicas/maxReplicas out of bounds", webhook=True)
        standard = "Standard" if self.new_mode_names else "RawDeployment"
        if annotations.get("serving.kserve.io/deploymentMode") != standard:  # Knative (KPA) autoscaling
            metric = predictor.get("scaleMetric", "concurrency")
            if metric not in ("concurrency", "rps"):
                raise Invalid(
                    f"the autoscaler metric '{metric}' is not supported for Knative Pod Autoscaler", webhook=True
                )
            if metric == "rps" and predictor.get("scaleTarget", 1) < 1:
                raise Invalid("the target for rps should be greater than 1", webhook=True)
        if not predictor.get("containers") and not any(
            k in predictor for k in ("model", "sklearn", "tensorflow", "pytorch", "triton", "xgboost")
        ):
            raise Invalid("exactly one of [Custom, ...] must be specified in PredictorSpec", webhook=True)

    # ------------------------------------------------------------ controller

    def deployment_mode(self, obj: dict[str, Any]) -> str:
        """GetDeploymentMode of this release."""
        recorded = (obj.get("status") or {}).get("deploymentMode")
        if self.records_mode and recorded:
            return recorded
        mode = (obj["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode")
        if self.new_mode_names:
            mode = {"RawDeployment": "Standard", "Serverless": "Knative"}.get(mode or "", mode)
            known = ("Standard", "Knative", "ModelMesh")
        else:
            known = ("RawDeployment", "Serverless", "ModelMesh")
        return mode if mode in known else self.default_mode

    def is_knative(self, mode: str) -> bool:
        return mode in ("Serverless", "Knative")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass
class Revision:
    name: str
    template: str  # the predictor minus the traffic fields, as Knative would see it
    storage_uri: str | None
    polls_left: int
    state: str = "Unknown"  # Unknown -> True | False
    message: str = ""


@dataclass
class Controller:
    """KServe + Knative reconciling one InferenceService, as far as a rollout can observe."""

    release: Release
    model_exists: Any  # callable(storage_uri) -> bool: what the storage initializer would find
    startup_polls: int = 1  # GETs before a new revision is Ready (or fails)
    revisions: dict[tuple[str, str], list[Revision]] = field(default_factory=dict)

    def reconcile(self, key: tuple[str, str], obj: dict[str, Any], *, tick: bool = False) -> None:
        status = obj.setdefault("status", {})
        mode = self.release.deployment_mode(obj)
        if self.release.records_mode:
            status["deploymentMode"] = mode
        predictor = obj["spec"]["predictor"]
        template = json.dumps({k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True)
        uri = next(
            (
                e.get("value")
                for c in predictor.get("containers", [])
                for e in c.get("env", [])
                if e.get("name") == "STORAGE_URI"
            ),
            None,
        )
        revisions = self.revisions.setdefault(key, [])
        if not revisions or revisions[-1].template != template:
            revisions.append(
                Revision(f"{key[1]}-predictor-{len(revisions) + 1:05d}", template, uri, self.startup_polls)
            )
        latest = revisions[-1]
        if tick and latest.state == "Unknown":
            latest.polls_left -= 1
        if latest.state == "Unknown" and latest.polls_left <= 0:
            if uri and self.model_exists(uri):
                latest.state = "True"
            else:
                latest.state, latest.message = (
                    "False",
                    (
                        f'Revision "{latest.name}" failed with message: Container storage-initializer: '
                        f"no model found under {uri}"
                    ),
                )
        ready = [r for r in revisions if r.state == "True"]
        component = status.setdefault("components", {}).setdefault("predictor", {})
        component["latestCreatedRevision"] = latest.name
        if ready:
            component["latestReadyRevision"] = ready[-1].name
        if not self.release.is_knative(mode):  # Standard: one Deployment, no revisions to split
            component.pop("traffic", None)
            self._conditions(obj, latest)
            return
        for _ in range(2):  # KServe converges in two reconciles after a rollback of a completed rollout
            self._route(predictor, component)
        self._conditions(obj, latest)

    def _route(self, predictor: dict[str, Any], component: dict[str, Any]) -> None:
        latest_ready = component.get("latestReadyRevision")
        rolled_out = component.get("latestRolledoutRevision", "")
        canary = predictor.get("canaryTrafficPercent")
        if canary is not None and rolled_out:  # ksvc_reconciler.go
            targets = [{"latestRevision": True, "percent": canary}]
            if canary < 100:
                targets.append(
                    {"revisionName": rolled_out, "latestRevision": False, "percent": 100 - canary, "tag": "prev"}
                )
        else:
            targets = [{"latestRevision": True, "percent": 100}]
        traffic = [{**t, "revisionName": t.get("revisionName") or latest_ready} for t in targets if latest_ready]
        per_revision: dict[str, int] = {}
        for t in traffic:
            per_revision[t["revisionName"]] = per_revision.get(t["revisionName"], 0) + t["percent"]
        for t in traffic:  # PropagateStatus
            if t["revisionName"] == latest_ready and t["latestRevision"]:
                if rolled_out != latest_ready:
                    if t["percent"] == 100:
                        component["previousRolledoutRevision"] = rolled_out
                        component["latestRolledoutRevision"] = latest_ready
                elif (
                    latest_ready == component["latestCreatedRevision"]
                    and t["percent"] < 100
                    and per_revision.get(t["revisionName"]) == 100
                    and component.get("previousRolledoutRevision")
                ):
                    component["latestRolledoutRevision"] = component["previousRolledoutRevision"]
        component["traffic"] = traffic
        for key in ("previousRolledoutRevision", "latestRolledoutRevision"):
            if not component.get(key):
                component.pop(key, None)

    def _conditions(self, obj: dict[str, Any], latest: Revision) -> None:
        condition = {"type": "Ready", "status": latest.state}
        if latest.state == "False":
            condition.update(reason="RevisionFailed", message=latest.message)
        elif latest.state == "Unknown":
            condition.update(
                reason="RevisionMissing", message="Configuration is waiting for a Revision to become ready."
            )
        obj["status"]["conditions"] = [condition]
        obj["status"]["observedGeneration"] = obj["metadata"]["generation"]
        if latest.state == "True":
            obj["status"]["url"] = f"http://{obj['metadata']['name']}.{obj['metadata']['namespace']}.example.com"
