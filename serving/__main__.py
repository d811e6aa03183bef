"""``python -m serving``: serve an exported chest-ct SavedModel with kserve (REST + gRPC, v2 protocol).

Example::

    python -m serving --model_dir runs/model --http_port 8080 --grpc_port 8081

kserve's standard server flags (``--http_port``, ``--grpc_port``,
``--model_name``, ``--max_threads``, ``--enable_grpc``...) are accepted as well
as the limits of ``serving.config``. The process exits with status 1 and a
one-line reason when the model directory or a limit cannot be used, before any
port is opened.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

# Before anything imports TensorFlow: keep its C++ INFO/WARNING chatter out of the server log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# kserve 0.21's app uses ORJSONResponse, which FastAPI now deprecates: one warning per route, no action possible here.
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")

import kserve.model_server as kserve_server  # noqa: E402  (parses kserve's flags from sys.argv on import)

from serving import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, config  # noqa: E402
from serving.model_dir import ModelLoadError, check_model_dir, read_model_info  # noqa: E402
from serving.precision import cpu_bf16  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        parents=[kserve_server.parser],
        description="Serve the chest-ct classifier over the KServe v2 / Open Inference Protocol (REST and gRPC).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME)
    parser.add_argument(
        "--model_dir",
        default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
        help="local directory of the exported SavedModel with model_metadata.json "
        "(env MODEL_DIR; KServe's storage initializer downloads to /mnt/models)",
    )
    config.add_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.workers != 1:
        sys.exit(
            "chest-ct serving: --workers must be 1 (each worker would load its own copy of the model); "
            "scale with more replicas instead"
        )
    try:
        cfg = config.from_args(args)
        cpu_bf16()  # a malformed CHEST_CT_CPU_BF16 override is refused here, before the model loads
    except ValueError as exc:
        sys.exit(f"chest-ct serving: {exc}")
    try:  # cheap checks first, before the slow TensorFlow import
        read_model_info(check_model_dir(args.model_dir))
    except ModelLoadError as exc:
        sys.exit(f"chest-ct serving: cannot serve --model_dir {args.model_dir}: {exc}")

    # kserve's servers read its module-level flags (e.g. the gRPC message limits): keep them in step.
    if not any(a.startswith("--grpc_max_receive_message_length") for a in argv):
        args.grpc_max_receive_message_length = cfg.max_request_bytes
    vars(kserve_server.args).update({k: v for k, v in vars(args).items() if hasattr(kserve_server.args, k)})

    from serving import log_filter
    from serving.predictor import ChestCtModel
    from serving.runner import container_cpus
    from serving.server import ChestCtModelServer

    # kserve sizes the event loop's default executor (Pillow checks, parsing) from a CPU count that reads
    # cgroup v1 only; on cgroup v2 it would see the node's CPUs. Same formula, with the container's CPUs.
    workers = args.max_asyncio_workers or min(32, container_cpus() + 4)
    server = ChestCtModelServer(
        cfg,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
    )  # constructing it configures logging, so the model load below is logged
    log_filter.install()

    model = ChestCtModel(args.model_name, args.model_dir, cfg)
    try:
        model.load()
    except ModelLoadError as exc:
        sys.exit(f"chest-ct serving: cannot serve --model_dir {args.model_dir}: {exc}")
    server.start([model])


if __name__ == "__main__":
    main()
