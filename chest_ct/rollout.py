"""Roll an InferenceService forward, promote its canary, roll it back, wait until it serves.

Talks to the Kubernetes API server with the official client
(``CustomObjectsApi``): create, merge-patch, read. Every write can be sent
first with ``dryRun=All``, and every write asks for ``fieldValidation=Strict``,
so the API server itself checks the object against the InferenceService
schema, KServe's admission webhooks and RBAC, and an unknown field is an error
rather than silently dropped.

KServe's canary semantics (pkg/controller/v1beta1/inferenceservice/reconcilers/
knative/ksvc_reconciler.go, apis/serving/v1beta1/inference_service_status.go):
with ``canaryTrafficPercent`` set and a revision already fully rolled out, the
latest revision gets that share and the last rolled-out one the rest; without
it the latest revision gets 100%. Changing the predictor creates a revision,
changing only ``canaryTrafficPercent`` does not. Hence:

- :func:`deploy` a new model: directly (100%) or as a canary (N%).
- :func:`promote` sends 100% to the canary that was evaluated, touching
  nothing but ``canaryTrafficPercent``.
- :func:`rollback` sends 100% back to the last fully rolled-out model
  (``canaryTrafficPercent: 0``; KServe also undoes a completed rollout this way).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chest_ct.inference_service import (
    DEPLOYMENT_MODE_ANNOTATION,
    GROUP,
    PLURAL,
    VERSION,
    check_percent,
    mode_of,
)

if TYPE_CHECKING:
    from kubernetes.client import Configuration, CustomObjectsApi

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The API server refused a change, or the InferenceService did not become Ready."""


def custom_objects_api(configuration: Configuration | None = None) -> CustomObjectsApi:
    """A client of the cluster's API server: in-cluster credentials, else the kubeconfig."""
    from kubernetes import client, config

    if configuration is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CustomObjectsApi()
    return client.CustomObjectsApi(client.ApiClient(configuration))


@dataclass(frozen=True)
class Status:
    """What the InferenceService reports, in the terms a rollout needs."""

    generation: int
    observed_generation: int
    ready: str  # "True", "False" or "Unknown"
    reason: str
    message: str
    deployment_mode: str | None
    canary_traffic_percent: int | None
    latest_created: str | None
    latest_ready: str | None
    latest_rolled_out: str | None
    previous_rolled_out: str | None
    traffic: list[dict[str, Any]] = field(default_factory=list)
    url: str | None = None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Status:
        status = obj.get("status") or {}
        predictor = (status.get("components") or {}).get("predictor") or {}
        ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        return cls(
            generation=int((obj.get("metadata") or {}).get("generation") or 0),
            observed_generation=int(status.get("observedGeneration") or 0),
            ready=ready.get("status", "Unknown"),
            reason=ready.get("reason", ""),
            message=ready.get("message", ""),
            deployment_mode=status.get("deploymentMode"),
            canary_traffic_percent=((obj.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent"),
            latest_created=predictor.get("latestCreatedRevision"),
            latest_ready=predictor.get("latestReadyRevision"),
            latest_rolled_out=predictor.get("latestRolledoutRevision"),
            previous_rolled_out=predictor.get("previousRolledoutRevision"),
            traffic=list(predictor.get("traffic") or []),
            url=status.get("url"),
        )

    @property
    def serving(self) -> bool:
        """Ready for the current spec, with the newest revision among those that are ready."""
        return (
            self.ready == "True"
            and self.observed_generation >= self.generation
            and (self.latest_created is None or self.latest_created == self.latest_ready)
        )

    def describe(self) -> str:
        split = ", ".join(f"{t.get('revisionName')} {t.get('percent')}%" for t in self.traffic if t.get("percent"))
        why = f"{self.reason}: {self.message}" if self.reason or self.message else "no reason given"
        return (
            f"Ready={self.ready} ({why}); generation {self.generation}, observed {self.observed_generation}; "
            f"revisions: latest {self.latest_created}, ready {self.latest_ready}"
            + (f"; traffic {split}" if split else "")
        )


class InferenceServices:
    """GET, create and merge-patch InferenceServices of one namespace, strictly validated by the server."""

    def __init__(self, api: CustomObjectsApi, namespace: str):
        self.api, self.namespace = api, namespace

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _refused("read", self.namespace, name, err) from None

    def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        try:
            return self.api.create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                dict(obj),
                field_validation="Strict",
                **({"dry_run": "All"} if dry_run else {}),
            )
        except ApiException as err:
            raise _refused("create", self.namespace, obj["metadata"]["name"], err) from None

    def patch(self, name: str, patch: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): a ``None`` value removes the field."""
        from kubernetes.client.rest import ApiException

        try:
            return self.api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                dict(patch),
                field_validation="Strict",
                **({"dry_run": "All"} if dry_run else {}),
            )
        except ApiException as err:
            raise _refused("patch", self.namespace, name, err) from None


def _refused(verb: str, namespace: str, name: str, err: Any) -> RolloutError:
    import json

    try:
        message = json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError):
        message = err.reason
    return RolloutError(f"{verb} {namespace}/{name}: the API server answered {err.status}: {message}")


@dataclass(frozen=True)
class Change:
    """A write sent (or, with dry_run, checked) and what the server returned."""

    action: str
    obj: dict[str, Any]
    note: str = ""


def deploy(isvcs: InferenceServices, obj: Mapping[str, Any], *, dry_run: bool = False) -> Change:
    """Create the InferenceService, or roll it to the model in ``obj``.

    ``obj["spec"]["predictor"]["canaryTrafficPercent"]`` set: the new model
    gets that share next to the last fully rolled-out one; absent: it gets
    100% (a canary in flight is dropped). The deployment-mode annotation
    follows what the running KServe recorded (0.15.1+ refuses any other value
    on update); a change of mode is refused, as KServe cannot switch in place.
    """
    body = copy.deepcopy(dict(obj))
    name = body["metadata"]["name"]
    predictor = body["spec"]["predictor"]
    canary = predictor.get("canaryTrafficPercent")
    check_percent(canary)
    existing = isvcs.get(name)
    if existing is None:
        predictor.pop("canaryTrafficPercent", None)  # nothing to split against yet
        return Change(
            "created",
            isvcs.create(body, dry_run=dry_run),
            "first model: 100% of traffic" + (" (no earlier model to split against)" if canary else ""),
        )

    current = Status.of(existing)
    wanted = mode_of(body["metadata"].get("annotations", {}).get(DEPLOYMENT_MODE_ANNOTATION))
    recorded = current.deployment_mode or (existing["metadata"].get("annotations") or {}).get(
        DEPLOYMENT_MODE_ANNOTATION
    )
    if recorded is not None and wanted is not None and mode_of(recorded) != wanted:
        raise RolloutError(
            f"deployment_mode: {isvcs.namespace}/{name} runs in {recorded} mode and KServe cannot switch it to "
            f"{wanted} in place; delete the InferenceService first or deploy in {recorded} mode"
        )
    if current.deployment_mode:  # keep the exact spelling KServe recorded (its webhook compares strings)
        body["metadata"]["annotations"][DEPLOYMENT_MODE_ANNOTATION] = current.deployment_mode
    note = "new model: 100% of traffic"
    if canary is None:
        predictor["canaryTrafficPercent"] = None  # merge patch: remove a canary left by an earlier rollout
        if current.canary_traffic_percent not in (None, 100):
            note += f" (replaces the canary at {current.canary_traffic_percent}%, which was never promoted)"
    else:
        if not current.latest_rolled_out:
            raise RolloutError(
                f"canary_traffic_percent: {isvcs.namespace}/{name} has no fully rolled-out model yet, so KServe "
                "would send 100% to the new one; deploy it without a canary first"
            )
        note = f"canary: {canary}% to the new model, {100 - canary}% to {current.latest_rolled_out}"
    return Change("patched", isvcs.patch(name, body, dry_run=dry_run), note)


def promote(isvcs: InferenceServices, name: str, *, dry_run: bool = False) -> Change:
    """Send 100% of traffic to the current canary; nothing else changes (no new revision)."""
    current = _existing(isvcs, name)
    if current.canary_traffic_percent in (None, 100):
        raise RolloutError(
            f"promote: {isvcs.namespace}/{name} has no canary in progress "
            f"(canaryTrafficPercent is {current.canary_traffic_percent})"
        )
    patched = isvcs.patch(name, {"spec": {"predictor": {"canaryTrafficPercent": None}}}, dry_run=dry_run)
    return Change(
        "promoted", patched, f"{current.latest_created} now gets 100% (was {current.canary_traffic_percent}%)"
    )


def rollback(isvcs: InferenceServices, name: str, *, dry_run: bool = False) -> Change:
    """Send 100% of traffic back to the last fully rolled-out model; nothing else changes."""
    current = _existing(isvcs, name)
    target = current.latest_rolled_out
    if current.canary_traffic_percent in (None, 100) or current.latest_rolled_out == current.latest_created:
        target = current.previous_rolled_out  # a completed rollout: KServe goes back one more
    if not target:
        raise RolloutError(f"rollback: {isvcs.namespace}/{name} has no earlier model to go back to")
    patched = isvcs.patch(name, {"spec": {"predictor": {"canaryTrafficPercent": 0}}}, dry_run=dry_run)
    return Change("rolled back", patched, f"{target} gets 100% again; {current.latest_created} gets 0%")


def _existing(isvcs: InferenceServices, name: str) -> Status:
    obj = isvcs.get(name)
    if obj is None:
        raise RolloutError(f"{isvcs.namespace}/{name}: no such InferenceService")
    return Status.of(obj)


def wait_ready(
    isvcs: InferenceServices,
    name: str,
    *,
    timeout_s: float = 600,
    poll_s: float = 5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Status:
    """Poll until the InferenceService serves its current spec; raise with its status message otherwise."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    deadline = clock() + timeout_s
    while True:
        obj = isvcs.get(name)
        if obj is None:
            raise RolloutError(f"{isvcs.namespace}/{name} disappeared while waiting for it to become Ready")
        status = Status.of(obj)
        if status.serving:
            return status
        if clock() >= deadline:
            raise RolloutError(f"{isvcs.namespace}/{name} not Ready after {timeout_s:g} s: {status.describe()}")
        log.info("waiting for %s/%s: %s", isvcs.namespace, name, status.describe())
        sleep(min(poll_s, max(0.0, deadline - clock())))
