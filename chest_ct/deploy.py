"""Publish a trained model, and the command line for what happens after: promote, roll back, inspect.

    python -m chest_ct.deploy status   [--name chest-ct] [--namespace chest-ct]
    python -m chest_ct.deploy promote  [--name ...] [--namespace ...] [--wait 600]
    python -m chest_ct.deploy rollback [--name ...] [--namespace ...] [--wait 600]
    python -m chest_ct.deploy render   --storage-uri s3://... [--kserve-version 0.15] [--mode Knative]

Credentials: in-cluster service account, else the kubeconfig (as kubectl).
The pipeline's deploy step calls :func:`deploy_model`; its pieces are
``model_store`` (S3), ``inference_service`` (the object) and ``rollout`` (the
API calls and KServe's canary rules).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chest_ct import rollout
from chest_ct.inference_service import (
    DEFAULT_IMAGE,
    DEFAULT_KSERVE_VERSION,
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    DEPLOYMENT_MODES,
    DeploymentMode,
    inference_service,
)
from chest_ct.model_store import model_uri, upload_model_dir

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

#: How long the deploy step waits for the new model to serve: image pull, model download, warm-up.
DEFAULT_READY_TIMEOUT_S = 600


@dataclass(frozen=True)
class Deployment:
    storage_uri: str
    change: rollout.Change
    status: rollout.Status


def deploy_model(
    model_dir: Path,
    *,
    model_store_uri: str,
    version: str,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    kserve_version: str = DEFAULT_KSERVE_VERSION,
    deployment_mode: DeploymentMode = "Knative",
    canary_traffic_percent: int | None = None,
    s3_endpoint_url: str | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    api: CustomObjectsApi | None = None,
) -> Deployment:
    """Upload the SavedModel to its own prefix, roll the InferenceService to it, wait until it serves.

    The object is sent with ``dryRun=All`` first, so a schema, admission or
    permission problem fails the step before the upload, and the InferenceService
    is left as it was.
    """
    storage_uri = model_uri(model_store_uri, version)
    obj = inference_service(
        storage_uri,
        name=name,
        namespace=namespace,
        image=image,
        kserve_version=kserve_version,
        deployment_mode=deployment_mode,
        canary_traffic_percent=canary_traffic_percent,
    )
    isvcs = rollout.InferenceServices(api or rollout.custom_objects_api(), namespace)
    rollout.deploy(isvcs, obj, dry_run=True)
    upload_model_dir(Path(model_dir), storage_uri, s3_endpoint_url)
    change = rollout.deploy(isvcs, obj)
    return Deployment(storage_uri, change, rollout.wait_ready(isvcs, name, timeout_s=ready_timeout_s))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chest_ct.deploy", description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command, text in (
        ("status", "show traffic and readiness"),
        ("promote", "send 100% to the canary"),
        ("rollback", "send 100% back to the last fully rolled-out model"),
    ):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("--name", default=DEFAULT_NAME)
        sub.add_argument("--namespace", default=DEFAULT_NAMESPACE)
        if command != "status":
            sub.add_argument(
                "--wait",
                type=float,
                default=DEFAULT_READY_TIMEOUT_S,
                metavar="SECONDS",
                help="wait this long for Ready (0: do not wait)",
            )
    render = commands.add_parser("render", help="print the InferenceService YAML (for GitOps or kubectl)")
    render.add_argument("--storage-uri", required=True)
    render.add_argument("--name", default=DEFAULT_NAME)
    render.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    render.add_argument("--image", default=DEFAULT_IMAGE)
    render.add_argument("--kserve-version", default=DEFAULT_KSERVE_VERSION)
    render.add_argument("--mode", choices=DEPLOYMENT_MODES, default="Knative")
    render.add_argument("--canary", type=int, help="canaryTrafficPercent (Knative mode)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "render":
            import yaml

            print(
                yaml.safe_dump(
                    inference_service(
                        args.storage_uri,
                        name=args.name,
                        namespace=args.namespace,
                        image=args.image,
                        kserve_version=args.kserve_version,
                        deployment_mode=args.mode,
                        canary_traffic_percent=args.canary,
                    ),
                    sort_keys=False,
                ),
                end="",
            )
            return 0
        isvcs = rollout.InferenceServices(rollout.custom_objects_api(), args.namespace)
        if args.command == "status":
            obj = isvcs.get(args.name)
            if obj is None:
                raise rollout.RolloutError(f"{args.namespace}/{args.name}: no such InferenceService")
            print(rollout.Status.of(obj).describe())
            return 0
        change = (rollout.promote if args.command == "promote" else rollout.rollback)(isvcs, args.name)
        print(f"{args.namespace}/{args.name} {change.action}: {change.note}")
        if args.wait > 0:
            print(rollout.wait_ready(isvcs, args.name, timeout_s=args.wait).describe())
        return 0
    except (ValueError, rollout.RolloutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
