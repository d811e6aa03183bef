"""bench.ingest, part 4: an S3 folder of small objects on a local moto server, one download at a time vs many."""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from bench.report import timed


def _serve_s3(port_queue, latency_s: float) -> None:
    """A moto S3 server (its own process, so the client and server do not share a GIL), with added latency."""
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)

    def slow(environ, start_response):
        if latency_s:
            time.sleep(latency_s)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, slow, threaded=True)
    port_queue.put(server.server_port)
    server.serve_forever()


def _put(client, body: bytes, i: int) -> None:
    client.put_object(Bucket="bench", Key=f"ct/{i % 2}/{i:05d}.png", Body=body)


def bench_s3(objects: int, latency_ms: float) -> tuple[list[list], dict]:
    import boto3
    from botocore.config import Config

    from chest_ct.sources import DEFAULT_S3_CONCURRENCY, fetch_dataset

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    rows: list[list] = []
    figures: dict = {"s3_objects": objects, "s3_latency_ms": latency_ms, "s3_concurrency": DEFAULT_S3_CONCURRENCY}
    for latency in (latency_ms, 0.0):
        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        server = ctx.Process(target=_serve_s3, args=(ports, latency / 1000), daemon=True)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{ports.get(timeout=60)}"
            client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=32))
            client.create_bucket(Bucket="bench")
            body = bytes(range(256)) * 8  # 2 KiB: a thumbnail-sized object, latency-bound
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(partial(_put, client, body), range(objects)))
            with tempfile.TemporaryDirectory() as tmp:
                one, fetched = timed(
                    fetch_dataset, "s3://bench/ct", Path(tmp) / "one", s3_endpoint_url=endpoint, s3_concurrency=1
                )
                assert fetched.downloaded_files == objects
                many, fetched = timed(fetch_dataset, "s3://bench/ct", Path(tmp) / "many", s3_endpoint_url=endpoint)
                assert fetched.downloaded_files == objects
        finally:
            server.terminate()
            server.join()
        rows.append([f"+{latency:g} ms per request", one, objects / one, many, objects / many, one / many])
        key = "s3_speedup" if latency == latency_ms else "s3_speedup_no_latency"
        figures[key] = round(one / many, 2)
        figures[f"s3_{'sequential' if latency == latency_ms else 'sequential_no_latency'}_s"] = round(one, 2)
        figures[f"s3_{'concurrent' if latency == latency_ms else 'concurrent_no_latency'}_s"] = round(many, 2)
        print(f"s3 +{latency} ms: one at a time {one:.1f}s, concurrent {many:.1f}s", file=sys.stderr, flush=True)
    return rows, figures
