"""Send the compiled chest-ct pipeline to a Kubeflow Pipelines server.

    python -m pipelines.submit upload   [PACKAGE] [--name NAME] [--version NAME]
    python -m pipelines.submit run      [--package PATH | --pipeline NAME] [--param name=value ...]
    python -m pipelines.submit schedule --cron "0 0 3 * * *" [--package PATH | --pipeline NAME] [--param ...]
    python -m pipelines.submit list     [--limit N]

Connection: ``--host`` or ``KFP_HOST`` (e.g. http://localhost:8080 after
``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``),
``--namespace`` or ``KFP_NAMESPACE`` (multi-user Kubeflow only) and a bearer
token in ``KFP_TOKEN`` (kept off the command line so it stays out of shell
history and process lists).

The CLI is a thin layer over the functions below, which take a ``kfp.Client``
so they can be driven against any server, including a test double.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import kfp

DEFAULT_PACKAGE = Path("pipelines/chest_ct_pipeline.yaml")
DEFAULT_EXPERIMENT = "chest-ct"


# ----------------------------------------------------------------------- cron

_MONTHS = {name: i for i, name in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), start=1)}
_WEEKDAYS = {name: i for i, name in enumerate("SUN MON TUE WED THU FRI SAT".split())}
#: (field name, lowest, highest, names, '?' allowed) in KFP's order: seconds first.
_CRON_FIELDS: tuple[tuple[str, int, int, Mapping[str, int], bool], ...] = (
    ("seconds", 0, 59, {}, False),
    ("minutes", 0, 59, {}, False),
    ("hours", 0, 23, {}, False),
    ("day of month", 1, 31, {}, True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _WEEKDAYS, True),
)


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression and return it normalised to single spaces.

    KFP's scheduler (robfig/cron) reads six fields with *seconds first*; the
    familiar five-field crontab would be accepted by the API and silently run
    at the wrong times (its minutes read as seconds), so it is refused with
    the corrected expression.
    """
    fields = (expression or "").split()
    if len(fields) == 5:
        fixed = " ".join(["0", *fields])
        raise ValueError(
            f"cron: KFP needs 6 fields with seconds first, got 5 in {expression!r}; did you mean {fixed!r}?"
        )
    if len(fields) != 6:
        raise ValueError(
            f"cron: expected 6 space-separated fields (seconds minutes hours day-of-month month day-of-week), "
            f"got {len(fields)} in {expression!r}"
        )
    for value, (name, low, high, names, question_mark) in zip(fields, _CRON_FIELDS):
        _check_cron_field(value, name, low, high, names, question_mark)
    return " ".join(fields)


def _check_cron_field(
    value: str, name: str, low: int, high: int, names: Mapping[str, int], question_mark: bool
) -> None:
    def bad(reason: str) -> ValueError:
        return ValueError(f"cron: {name} field {value!r}: {reason}")

    def number(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            raise bad(f"{token!r} is not a number" + (f" or one of {', '.join(names)}" if names else ""))
        if not low <= int(token) <= high:
            raise bad(f"{token} is outside {low}-{high}")
        return int(token)

    for item in value.split(","):
        base, slash, step = item.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            raise bad(f"step {step!r} must be a positive integer")
        if base == "?":
            if not question_mark:
                raise bad("'?' is only allowed in day of month and day of week")
            if slash:
                raise bad("'?' cannot have a step")
        elif base != "*":
            start, dash, end = base.partition("-")
            first = number(start)
            if dash and number(end) < first:
                raise bad(f"range {base} runs backwards")


# --------------------------------------------------------------- parameters


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


def pipeline_parameters(spec: Mapping[str, Any]) -> dict[str, str]:
    """Input parameter name -> KFP type (STRING, NUMBER_INTEGER...) of a pipeline spec.

    Accepts the bare PipelineSpec or the ``{"pipeline_spec": ...}`` wrapper the
    API returns for a pipeline version that also carries a platform spec.
    """
    if "root" not in spec and isinstance(spec.get("pipeline_spec"), Mapping):
        spec = spec["pipeline_spec"]
    declared = ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
    return {name: definition.get("parameterType", "STRING") for name, definition in declared.items()}


def parse_params(pairs: Sequence[str], declared: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn repeated ``name=value`` options into typed pipeline arguments.

    With the pipeline's declared inputs, each value is converted to its
    declared type and unknown names are refused (the server would only report
    them once the run is already queued). Without them, JSON-looking values
    (numbers, booleans, lists) are decoded and anything else stays a string.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        name, equals, raw = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ValueError(f"--param: expected name=value, got {pair!r}")
        if name in params:
            raise ValueError(f"--param {name}: given more than once")
        if declared is None:
            params[name] = _guess_value(raw)
            continue
        if name not in declared:
            raise ValueError(
                f"--param {name}: the pipeline has no such input (inputs: {', '.join(sorted(declared)) or 'none'})"
            )
        params[name] = _convert_param(name, raw, declared[name])
    return params


def _guess_value(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, (bool, int, float, list, dict)) else raw


def _convert_param(name: str, raw: str, parameter_type: str) -> Any:
    def bad(expected: str) -> ValueError:
        return ValueError(f"--param {name}: expected {expected}, got {raw!r}")

    if parameter_type == "STRING":
        return raw
    if parameter_type == "NUMBER_INTEGER":
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if parameter_type == "NUMBER_DOUBLE":
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if parameter_type == "BOOLEAN":
        if raw.lower() not in ("true", "false"):
            raise bad("true or false")
        return raw.lower() == "true"
    expected_type, label = {"LIST": (list, "a JSON list"), "STRUCT": (dict, "a JSON object")}.get(
        parameter_type, (object, "JSON")
    )
    try:
        value = json.loads(raw)
    except ValueError:
        raise bad(label) from None
    if not isinstance(value, expected_type):
        raise bad(label)
    return value


# ------------------------------------------------------------------ client


def connect(host: str | None, namespace: str | None = None, token: str | None = None) -> kfp.Client:
    """A KFP client for ``host``; a bearer ``token`` goes in the Authorization header."""
    if not host:
        raise ValueError(
            "host: required (--host or KFP_HOST), e.g. http://localhost:8080 after "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`"
        )
    if not re.match(r"^https?://", host):
        raise ValueError(f"host: expected an http:// or https:// URL, got {host!r}")
    import kfp

    # kfp.Client treats namespace="kubeflow" as "not multi-user"; any other
    # value becomes the namespace of experiments, runs and pipelines.
    return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or None)


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
    return PipelineTarget(package=Path(package), parameters=pipeline_parameters(load_pipeline_spec(package)))


def find_pipeline_id(client: kfp.Client, name: str, namespace: str | None = None) -> str | None:
    """The id of the pipeline displayed as ``name``, or None."""
    name_filter = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    found = client.list_pipelines(filter=name_filter, namespace=namespace).pipelines or []
    if len(found) > 1:
        raise ValueError(f"pipeline: {len(found)} pipelines are named {name!r}; names must be unique")
    return found[0].pipeline_id if found else None


def latest_version_target(client: kfp.Client, name: str, namespace: str | None = None) -> PipelineTarget:
    """The newest uploaded version of pipeline ``name``, with its declared inputs."""
    pipeline_id = find_pipeline_id(client, name, namespace)
    if pipeline_id is None:
        raise ValueError(f"pipeline: no pipeline named {name!r} on the server; run `upload` first")
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise ValueError(f"pipeline: {name!r} has no versions")
    version = versions[0]
    spec = version.pipeline_spec if isinstance(version.pipeline_spec, Mapping) else None
    return PipelineTarget(
        pipeline_id=pipeline_id,
        version_id=version.pipeline_version_id,
        parameters=pipeline_parameters(spec) if spec else None,
    )


@dataclass(frozen=True)
class UploadResult:
    pipeline_id: str
    version_id: str | None
    new_pipeline: bool


def upload(
    client: kfp.Client,
    package: Path,
    name: str | None = None,
    version: str | None = None,
    namespace: str | None = None,
) -> UploadResult:
    """Upload ``package`` as pipeline ``name``, or as a new version if the name exists.

    Runs and schedules keep pointing at the version they were started from, so
    re-uploading never changes what an existing schedule executes.
    """
    spec = load_pipeline_spec(package)
    info = spec.get("pipelineInfo") or {}
    name = name or info.get("name")
    if not name:
        raise ValueError("name: the package has no pipelineInfo.name; pass --name")
    pipeline_id = find_pipeline_id(client, name, namespace)
    if pipeline_id is None:
        created = client.upload_pipeline(
            str(package), pipeline_name=name, description=info.get("description"), namespace=namespace
        )
        return UploadResult(created.pipeline_id, None, new_pipeline=True)
    version = version or f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    uploaded = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
    return UploadResult(pipeline_id, uploaded.pipeline_version_id, new_pipeline=False)


def experiment_id(client: kfp.Client, name: str, namespace: str | None = None) -> str:
    """The id of experiment ``name``, created if missing."""
    return client.create_experiment(name, namespace=namespace).experiment_id


def start_run(
    client: kfp.Client,
    target: PipelineTarget,
    params: Mapping[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Start one run of ``target`` in ``experiment``; return the run id."""
    run = client.run_pipeline(
        experiment_id=experiment_id(client, experiment, namespace),
        job_name=run_name or f"chest-ct-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        params=dict(params),
        service_account=service_account,
        **target.kfp_kwargs(),
    )
    return run.run_id


def schedule(
    client: kfp.Client,
    target: PipelineTarget,
    cron: str,
    params: Mapping[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    name: str = "chest-ct-retrain",
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Create a recurring run on ``cron`` (6 fields, seconds first); return its id.

    One run at a time and no catch-up: retraining is idempotent, so a paused
    schedule that resumes should train once on current data, not replay every
    missed slot.
    """
    recurring = client.create_recurring_run(
        experiment_id=experiment_id(client, experiment, namespace),
        job_name=name,
        cron_expression=validate_cron(cron),
        max_concurrency=1,
        no_catchup=True,
        params=dict(params),
        service_account=service_account,
        **target.kfp_kwargs(),
    )
    return recurring.recurring_run_id


def list_runs(
    client: kfp.Client, *, experiment: str = DEFAULT_EXPERIMENT, namespace: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The newest runs of ``experiment`` as plain dicts (empty if it does not exist yet)."""
    try:
        found = client.get_experiment(experiment_name=experiment, namespace=namespace)
    except ValueError:  # kfp raises ValueError for a missing experiment
        return []
    response = client.list_runs(experiment_id=found.experiment_id, page_size=limit, sort_by="created_at desc")
    return [
        {
            "run_id": run.run_id,
            "name": run.display_name,
            "state": run.state,
            "created_at": run.created_at.isoformat() if isinstance(run.created_at, datetime) else run.created_at,
        }
        for run in response.runs or []
    ]


# --------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    # Connection options go after the subcommand, on every subcommand alike.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API/UI URL (env KFP_HOST)")
    common.add_argument(
        "--namespace", default=os.environ.get("KFP_NAMESPACE"), help="profile namespace (env KFP_NAMESPACE)"
    )
    common.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (default: %(default)s)")

    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("upload", parents=[common], help="upload the compiled pipeline (or a new version)")
    up.add_argument("package", nargs="?", type=Path, default=DEFAULT_PACKAGE, help="default: %(default)s")
    up.add_argument("--name", help="pipeline name (default: the name compiled into the package)")
    up.add_argument("--version", help="version name when the pipeline exists (default: <name>-<UTC time>)")

    for command, help_text in (("run", "start a run"), ("schedule", "create a recurring run")):
        sub = commands.add_parser(command, parents=[common], help=help_text)
        source = sub.add_mutually_exclusive_group()
        source.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="compiled YAML (default)")
        source.add_argument("--pipeline", help="run the newest uploaded version of this pipeline instead")
        sub.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
        sub.add_argument("--service-account", help="Kubernetes service account the run's pods use")
        if command == "run":
            sub.add_argument("--run-name", help="default: chest-ct-<UTC time>")
        else:
            sub.add_argument("--cron", required=True, help='6 fields, seconds first, e.g. "0 0 3 * * *"')
            sub.add_argument("--name", default="chest-ct-retrain", help="recurring run name (default: %(default)s)")

    ls = commands.add_parser("list", parents=[common], help="list the newest runs of the experiment")
    ls.add_argument("--limit", type=int, default=20)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schedule":
            validate_cron(args.cron)  # before connecting: a typo needs no server
        client = connect(args.host, args.namespace, os.environ.get("KFP_TOKEN"))
        return _dispatch(client, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(client: kfp.Client, args: argparse.Namespace) -> int:
    namespace = args.namespace
    if args.command == "upload":
        result = upload(client, args.package, args.name, args.version, namespace)
        what = "pipeline" if result.new_pipeline else f"version {result.version_id} of pipeline"
        print(f"uploaded {what} {result.pipeline_id}")
        return 0
    if args.command == "list":
        for run in list_runs(client, experiment=args.experiment, namespace=namespace, limit=args.limit):
            print(f"{run['run_id']}  {run['state'] or '-':<10}  {run['created_at'] or '-'}  {run['name']}")
        return 0

    target = (
        latest_version_target(client, args.pipeline, namespace) if args.pipeline else package_target(args.package)
    )
    params = parse_params(args.param, target.parameters)
    if args.command == "run":
        run_id = start_run(
            client, target, params, experiment=args.experiment, run_name=args.run_name,
            namespace=namespace, service_account=args.service_account,
        )
        print(f"started run {run_id}")
    else:
        recurring_id = schedule(
            client, target, args.cron, params, experiment=args.experiment, name=args.name,
            namespace=namespace, service_account=args.service_account,
        )
        print(f"scheduled recurring run {recurring_id} ({validate_cron(args.cron)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
