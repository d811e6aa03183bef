"""What the submit CLI does on a Kubeflow Pipelines server, as functions over ``kfp.Client``.

Each function takes the client, so the same code is driven against a real
server or the stand-in in the tests. In multi-user Kubeflow every experiment,
run and private pipeline lives in a profile namespace and the API server
refuses requests without one ("An experiment cannot have an empty namespace in
multi-user mode"); :func:`connect` asks the server which mode it runs in and
refuses to go on without a namespace there, before anything is created.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.cron import validate_cron
from pipelines.params import spec_inputs

if TYPE_CHECKING:
    import kfp

DEFAULT_PACKAGE = Path("pipelines/chest_ct_pipeline.yaml")
DEFAULT_EXPERIMENT = "chest-ct"


@dataclass(frozen=True)
class Connection:
    """A client and the namespace every call uses (None on a single-user server)."""

    client: kfp.Client
    namespace: str | None
    multi_user: bool


def connect(host: str | None, namespace: str | None = None, token: str | None = None) -> Connection:
    """A KFP client for ``host``; a bearer ``token`` goes in the Authorization header.

    The token is what multi-user Kubeflow authenticates: a Kubernetes service
    account token minted for the audience ``pipelines.kubeflow.org`` (see
    docs/cluster.md), or the user's own when going through the Kubeflow ingress.
    """
    if not host:
        raise ValueError(
            "host: required (--host or KFP_HOST), e.g. http://localhost:8080 after "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`"
        )
    if not re.match(r"^https?://", host):
        raise ValueError(f"host: expected an http:// or https:// URL, got {host!r}")
    import kfp

    # kfp.Client treats namespace="kubeflow" as "none given"; the namespace is
    # passed explicitly to every call below instead of relying on its context file.
    client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or None)
    multi_user = bool(client.get_kfp_healthz().multi_user)
    if multi_user and not namespace:
        raise ValueError(
            "namespace: this KFP server runs in multi-user mode (Kubeflow profiles); pass --namespace <profile> "
            "or set KFP_NAMESPACE, e.g. kubeflow-user-example-com"
        )
    return Connection(client, namespace if multi_user else None, multi_user)


def load_pipeline_spec(package: Path) -> dict[str, Any]:
    """The PipelineSpec document of a compiled pipeline YAML (the first document)."""
    package = Path(package)
    if not package.is_file():
        raise ValueError(f"package: {package} does not exist; compile the pipeline first (make compile)")
    with package.open() as stream:
        first = next(iter(yaml.safe_load_all(stream)), None)
    if not isinstance(first, dict) or "root" not in first:
        raise ValueError(f"package: {package} is not a compiled KFP pipeline (no 'root' section)")
    return first


@dataclass(frozen=True)
class PipelineTarget:
    """What a run executes: a local compiled package, or an uploaded pipeline version."""

    package: Path | None = None
    pipeline_id: str | None = None
    version_id: str | None = None
    parameters: Mapping[str, str] | None = None

    def kfp_kwargs(self) -> dict[str, Any]:
        if self.package is not None:
            return {"pipeline_package_path": str(self.package)}
        return {"pipeline_id": self.pipeline_id, "version_id": self.version_id}


def package_target(package: Path) -> PipelineTarget:
    return PipelineTarget(package=Path(package), parameters=spec_inputs(load_pipeline_spec(package)))


def find_pipeline_id(kfp_: Connection, name: str) -> str | None:
    """The id of the pipeline displayed as ``name`` (in the namespace, or shared), or None."""
    name_filter = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = kfp_.client.list_pipelines(filter=name_filter, namespace=kfp_.namespace).pipelines or []
    if len(found) > 1:
        raise ValueError(f"pipeline: {len(found)} pipelines are named {name!r}; names must be unique")
    return found[0].pipeline_id if found else None


def latest_version_target(kfp_: Connection, name: str) -> PipelineTarget:
    """The newest uploaded version of pipeline ``name``, with its declared inputs."""
    pipeline_id = find_pipeline_id(kfp_, name)
    if pipeline_id is None:
        raise ValueError(f"pipeline: no pipeline named {name!r} on the server; run `upload` first")
    versions = kfp_.client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise ValueError(f"pipeline: {name!r} has no versions")
    version = versions[0]
    spec = version.pipeline_spec if isinstance(version.pipeline_spec, Mapping) else None
    return PipelineTarget(
        pipeline_id=pipeline_id, version_id=version.pipeline_version_id, parameters=spec_inputs(spec) if spec else None
    )


@dataclass(frozen=True)
class UploadResult:
    pipeline_id: str
    version_id: str | None
    new_pipeline: bool


def upload(kfp_: Connection, package: Path, name: str | None = None, version: str | None = None) -> UploadResult:
    """Upload ``package`` as pipeline ``name``, or as a new version if the name exists.

    In multi-user mode the pipeline is private to the namespace. Runs and
    schedules keep the version they were started from, so re-uploading never
    changes what an existing schedule executes.
    """
    spec = load_pipeline_spec(package)
    info = spec.get("pipelineInfo") or {}
    name = name or info.get("name")
    if not name:
        raise ValueError("name: the package has no pipelineInfo.name; pass --name")
    pipeline_id = find_pipeline_id(kfp_, name)
    if pipeline_id is None:
        created = kfp_.client.upload_pipeline(
            str(package), pipeline_name=name, description=info.get("description"), namespace=kfp_.namespace
        )
        return UploadResult(created.pipeline_id, None, new_pipeline=True)
    version = version or f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    uploaded = kfp_.client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
    return UploadResult(pipeline_id, uploaded.pipeline_version_id, new_pipeline=False)


def experiment_id(kfp_: Connection, name: str) -> str:
    """The id of experiment ``name`` in the namespace, created if missing."""
    return kfp_.client.create_experiment(name, namespace=kfp_.namespace).experiment_id


def start_run(
    kfp_: Connection,
    target: PipelineTarget,
    params: Mapping[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    service_account: str | None = None,
) -> str:
    """Start one run of ``target`` in ``experiment`` (whose namespace the run inherits); return the run id."""
    run = kfp_.client.run_pipeline(
        experiment_id=experiment_id(kfp_, experiment),
        job_name=run_name or f"chest-ct-{datetime.now(UTC):%Y%m%d-%H%M%S}",
        params=dict(params),
        service_account=service_account,
        **target.kfp_kwargs(),
    )
    return run.run_id


def schedule(
    kfp_: Connection,
    target: PipelineTarget,
    cron: str,
    params: Mapping[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str = "chest-ct-retrain",
    service_account: str | None = None,
) -> str:
    """Create a recurring run on ``cron`` (KFP's format, see pipelines/cron.py); return its id.

    One run at a time and no catch-up: retraining is idempotent, so a paused
    schedule that resumes should train once on current data, not replay every
    missed slot.
    """
    recurring = kfp_.client.create_recurring_run(
        experiment_id=experiment_id(kfp_, experiment),
        job_name=name,
        cron_expression=validate_cron(cron),
        max_concurrency=1,
        no_catchup=True,
        params=dict(params),
        service_account=service_account,
        **target.kfp_kwargs(),
    )
    return recurring.recurring_run_id


def list_runs(kfp_: Connection, *, experiment: str = DEFAULT_EXPERIMENT, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs of ``experiment`` as plain dicts (empty if it does not exist yet)."""
    try:
        found = kfp_.client.get_experiment(experiment_name=experiment, namespace=kfp_.namespace)
    except ValueError:  # kfp raises ValueError for a missing experiment
        return []
    response = kfp_.client.list_runs(experiment_id=found.experiment_id, page_size=limit, sort_by="created_at desc")
    return [
        {
            "run_id": run.run_id,
            "name": run.display_name,
            "state": run.state,
            "created_at": run.created_at.isoformat() if isinstance(run.created_at, datetime) else run.created_at,
        }
        for run in response.runs or []
    ]
