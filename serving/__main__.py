"""``python -m serving``: serve an exported chest-ct SavedModel with kserve.ModelServer (REST + gRPC, v2).

Example::

    python -m serving --model_dir runs/model --http_port 8080 --grpc_port 8081

kserve's standard server flags (``--http_port``, ``--grpc_port``,
``--model_name``, ``--max_threads``, ``--enable_grpc``...) are accepted as well
as the flags below. The process exits with status 1 and a one-line reason when
the model directory cannot be served, before any port is opened.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

# Before anything imports TensorFlow: keep its C++ INFO/WARNING chatter out of the server log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# kserve 0.21's app uses ORJSONResponse, which FastAPI now deprecates: one warning per route, no action possible here.
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")

import kserve.model_server as kserve_server  # noqa: E402  (parses kserve's flags from sys.argv on import)

from serving import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME  # noqa: E402
from serving.model_dir import ModelLoadError, check_model_dir, read_model_info  # noqa: E402
from serving.settings import ENV_DEFAULTS, ServingSettings, env_default  # noqa: E402
from serving.validation import Limits  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving", parents=[kserve_server.parser],
        description="Serve the chest-ct classifier over the KServe v2 / Open Inference Protocol (REST and gRPC).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(model_name=DEFAULT_MODEL_NAME)
    parser.add_argument("--model_dir", default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
                        help="local directory of the exported SavedModel with model_metadata.json "
                             "(env MODEL_DIR; KServe's storage initializer downloads to /mnt/models)")

    def env_help(name: str, text: str) -> str:
        return f"{text} (env {ENV_DEFAULTS[name][0]})"

    parser.add_argument("--max_request_bytes", type=int, default=env_default("max_request_bytes"),
                        help=env_help("max_request_bytes", "largest REST body (after decompression) and gRPC message "
                                                           "accepted; larger ones get 413 / RESOURCE_EXHAUSTED"))
    parser.add_argument("--max_images", type=int, default=env_default("max_images"),
                        help=env_help("max_images", "most images (N) per request"))
    parser.add_argument("--max_image_pixels", type=int, default=env_default("max_image_pixels"),
                        help=env_help("max_image_pixels", "most pixels (width x height) per image, read from the "
                                                          "header before decoding"))
    parser.add_argument("--max_batch_size", type=int, default=env_default("max_batch_size"),
                        help=env_help("max_batch_size", "most images per model call: larger requests are split, "
                                                        "concurrent smaller ones merged"))
    parser.add_argument("--max_batch_wait_ms", type=float, default=env_default("max_batch_wait_ms"),
                        help=env_help("max_batch_wait_ms", "how long a request may wait for others to share its "
                                                           "model call; 0 merges only requests already queued"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.workers != 1:
        sys.exit("chest-ct serving: --workers must be 1 (each worker would load its own copy of the model); "
                 "scale with more replicas instead")
    try:
        settings = ServingSettings(
            max_request_bytes=args.max_request_bytes,
            limits=Limits(max_images=args.max_images, max_image_pixels=args.max_image_pixels),
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
        )
    except ValueError as exc:
        sys.exit(f"chest-ct serving: {exc}")
    try:  # cheap checks first, before the slow TensorFlow import
        read_model_info(check_model_dir(args.model_dir))
    except ModelLoadError as exc:
        sys.exit(f"chest-ct serving: cannot serve --model_dir {args.model_dir}: {exc}")

    # kserve's servers read its module-level flags (e.g. the gRPC message limits): keep them in step.
    if not any(a.startswith("--grpc_max_receive_message_length") for a in argv):
        args.grpc_max_receive_message_length = settings.max_request_bytes
    vars(kserve_server.args).update({k: v for k, v in vars(args).items() if hasattr(kserve_server.args, k)})

    server = kserve_server.ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, workers=1, max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format, event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
    )  # constructing it configures logging, so the model load below is logged

    from serving import log_filter, rest
    from serving.predictor import ChestCtModel
    from serving.repository import FixedModelRepository

    server.model_repository_extension = FixedModelRepository(server.registered_models)

    log_filter.install()

    model = ChestCtModel(args.model_name, args.model_dir, settings)
    try:
        model.load()
    except ModelLoadError as exc:
        sys.exit(f"chest-ct serving: cannot serve --model_dir {args.model_dir}: {exc}")
    rest.install(kserve_server.app, server.dataplane, model)
    server.start([model])


if __name__ == "__main__":
    main()
