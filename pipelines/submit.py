"""Send the compiled chest-ct pipeline to a Kubeflow Pipelines server.

    python -m pipelines.submit upload   [PACKAGE] [--name NAME] [--version NAME]
    python -m pipelines.submit run      [--package PATH | --pipeline NAME] [--param name=value ...]
    python -m pipelines.submit schedule --cron "0 0 3 * * *" [--package PATH | --pipeline NAME] [--param ...]
    python -m pipelines.submit list     [--limit N]

Connection: ``--host`` or ``KFP_HOST`` (e.g. http://localhost:8080 after
``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``, or
https://<kubeflow>/pipeline through the Kubeflow ingress), ``--namespace`` or
``KFP_NAMESPACE`` (your profile; required on multi-user Kubeflow) and a bearer
token in ``KFP_TOKEN`` (kept off the command line so it stays out of shell
history and process lists; see docs/cluster.md for minting one).

This module is only the command line: parameters are parsed by
``pipelines.params`` (the same parser as ``make run``), cron expressions
checked by ``pipelines.cron`` and the server driven by ``pipelines.kfp_client``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines import kfp_client
from pipelines.cron import next_runs, validate_cron
from pipelines.kfp_client import DEFAULT_EXPERIMENT, DEFAULT_PACKAGE, Connection
from pipelines.params import parse_params


def build_parser() -> argparse.ArgumentParser:
    # Connection options go after the subcommand, on every subcommand alike.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API/UI URL (env KFP_HOST)")
    common.add_argument(
        "--namespace",
        default=os.environ.get("KFP_NAMESPACE"),
        help="profile namespace, required on multi-user Kubeflow (env KFP_NAMESPACE)",
    )
    common.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (default: %(default)s)")

    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=(__doc__ or "").split("\n\n")[0])
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
            sub.add_argument("--cron", required=True, help='6 fields, seconds first, e.g. "0 0 3 * * *" (UTC)')
            sub.add_argument("--name", default="chest-ct-retrain", help="recurring run name (default: %(default)s)")

    ls = commands.add_parser("list", parents=[common], help="list the newest runs of the experiment")
    ls.add_argument("--limit", type=int, default=20)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schedule":
            validate_cron(args.cron)  # before connecting: a typo needs no server
        connection = kfp_client.connect(args.host, args.namespace, os.environ.get("KFP_TOKEN"))
        return _dispatch(connection, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(kfp_: Connection, args: argparse.Namespace) -> int:
    if args.command == "upload":
        result = kfp_client.upload(kfp_, args.package, args.name, args.version)
        what = "pipeline" if result.new_pipeline else f"version {result.version_id} of pipeline"
        print(f"uploaded {what} {result.pipeline_id}")
        return 0
    if args.command == "list":
        for run in kfp_client.list_runs(kfp_, experiment=args.experiment, limit=args.limit):
            print(f"{run['run_id']}  {run['state'] or '-':<10}  {run['created_at'] or '-'}  {run['name']}")
        return 0

    target = (
        kfp_client.latest_version_target(kfp_, args.pipeline)
        if args.pipeline
        else kfp_client.package_target(args.package)
    )
    params = parse_params(args.param, target.parameters)
    if args.command == "run":
        run_id = kfp_client.start_run(
            kfp_,
            target,
            params,
            experiment=args.experiment,
            run_name=args.run_name,
            service_account=args.service_account,
        )
        print(f"started run {run_id}")
        return 0
    recurring_id = kfp_client.schedule(
        kfp_,
        target,
        args.cron,
        params,
        experiment=args.experiment,
        name=args.name,
        service_account=args.service_account,
    )
    upcoming = ", ".join(f"{t:%Y-%m-%d %H:%M:%S}" for t in next_runs(args.cron))
    print(f"scheduled recurring run {recurring_id} ({validate_cron(args.cron)}; next, UTC: {upcoming})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
