"""Serving speed, overload and bf16: the real KServe server (REST and gRPC v2) against the SavedModel in process.

    python -m bench.serve [--quick] [--no-write] [--image PNG] [--overload-seconds S] [--overload-clients N]
                          [--max-batch-size B] [--max-queued-images Q] [--server-arg=--flag=value ...]

(Over 300 lines: ``main`` orders the phases, which share one server, one in-process floor and one
CPU-share meter, and ``report`` turns what they measured into the tables, targets and JSON line; the
phases' own code is in ``serve_clients``, ``serve_floor``, ``serve_overload``, ``serve_precision`` and
``serve_process``.)

The model is the exported 224 px chest-ct SavedModel (random weights: same speed
as a trained one), the request one real CT image from
../shared/data/chest-ct/valid/adenocarcinoma (else a generated 512x512 grayscale PNG).

- floor: ``serving_default`` of the SavedModel called in this process on the same
  encoded image: batch-1 latency (p50 after warm-up) and the best throughput over
  batch sizes 1, 4, 8, 16, 32 (the most any server around this model can do);
  also the cost of one call on an image at the pixel cap;
- chest-ct: ``python -m serving`` on loopback with its defaults, measured from
  outside like a client sees it: sequential single-image requests over REST
  (JSON, base64) and gRPC (raw bytes), p50/p99; the same REST request naming the
  opt-in ``heatmap`` output, against its own floor (``explain_images`` in process)
  and against the plain request (the heatmap's price); REST throughput with 1, 8 and 16
  concurrent clients (a refused request is sent again after 0.1 s); time from
  process spawn to ``/v2/health/ready`` = 200; peak resident memory of the server
  process and its children, sampled throughout;
- overload (``bench.serve_overload``): 128 clients for 60 s, 90% one image, 5% 64
  images, 5% eight images at the pixel cap, the server under the pod's memory
  limit (killed and restarted past it, as the OOM killer would);
- bf16 (``bench.serve_precision``): a second server with ``--precision bf16`` against
  the same float32 floor (the main server runs ``--precision fp32``).

Targets: REST p50 <= 1.10x floor p50 (with the heatmap: its explain floor); p99 <= 1.5x p50; 8 clients >= 0.9x the
floor's best throughput; ready <= 8 s; memory <= 1.5 GB (1536 MiB). Overload: no
restart, peak memory under 80% of the pod's limit, admitted work >= 0.9x the
floor's best, refusals answered in p99 <= 50 ms, one-image p99 <= 3x unloaded.
bf16 (a CPU with native bf16): 16 clients >= 1.7x the float32 floor's best, p50 <=
0.65x the float32 floor, answers within 0.01 of float32 and no label flip.

The machine may be shared, so ratios are protected from background load: the
sequential floor, REST and gRPC calls are interleaved round by round; each
throughput phase records the CPU share other processes took and is measured once
more (the cleaner run kept) when it was over 10%; the floor's best throughput is
the best of its sweep and a second measurement after the load test.
``--quick`` (about 2 minutes) is for development; the default is the full run (about 4.5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import serve_overload, serve_precision  # noqa: E402
from bench.report import emit, machine, pct, table, write_section  # noqa: E402
from bench.serve_clients import (
    GrpcClient,
    RestClient,
    interleaved_latency,
    rejected_by_reason,  # noqa: E402
    throughput,
)
from bench.serve_floor import IMAGE_SIZE, CpuShare, Floor, export_model, request_image, say  # noqa: E402
from bench.serve_process import Server, pod_memory_limit  # noqa: E402

#: A request naming the opt-in heatmap (with the default outputs).
HEATMAP_OUTPUTS = ("probability", "label", "ood_score", "in_distribution", "heatmap")
TARGETS = {
    "p50_ratio": 1.10,
    "heatmap_p50_ratio": 1.10,
    "p99_over_p50": 1.5,
    "throughput_ratio_8": 0.9,
    "ready_s": 8.0,
    "rss_mb": 1536.0,
    "overload_restarts": 0,
    "overload_rss_share": 0.8,
    "overload_admitted_ratio": 0.9,
    "overload_reject_p99_ms": 50.0,
    "overload_small_p99_ratio": 3.0,
    "bf16_ips_16_ratio": 1.7,
    "bf16_p50_ratio": 0.65,
    "bf16_max_abs_diff": 0.01,
    "bf16_label_flips": 0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter load (development runs)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--image", type=Path, default=None, help="PNG/JPEG to send (default: a real valid image)")
    parser.add_argument(
        "--overload-seconds", type=float, default=None, help="overload phase length (default 60, 20 with --quick)"
    )
    parser.add_argument("--overload-clients", type=int, default=128, help="concurrent clients in the overload phase")
    parser.add_argument("--cap-images", type=int, default=8, help="images per pixel-cap request in the overload mix")
    parser.add_argument("--max-batch-size", type=int, default=None, help="server flag (default: the server's)")
    parser.add_argument("--max-queued-images", type=int, default=None, help="server flag (default: the server's)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="any other server flag, e.g. --server-arg=--deadline_ms=10000"
    )
    parser.add_argument("--server-log", type=Path, default=None, help="keep the server's log at this path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import psutil

    # A plain `kill` (SIGTERM) must still run the finally blocks that stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = args.quick
    batch_sizes = [1, 8] if quick else [1, 4, 8, 16, 32]
    min_images = 8 if quick else 32
    warmup, sequential = (3, 15) if quick else (5, 50)
    duration = 8.0 if quick else 20.0
    overload_s = args.overload_seconds or (20.0 if quick else 60.0)
    extra = [*args.server_arg]
    for flag, value in (("--max_batch_size", args.max_batch_size), ("--max_queued_images", args.max_queued_images)):
        if value is not None:
            extra += [flag, str(value)]
    limit = pod_memory_limit()
    # The main server runs float32 (the floor's arithmetic) unless told otherwise; bf16 has its own phase.
    main_extra = extra if any(a.startswith("--precision") for a in extra) else ["--precision", "fp32", *extra]

    image, image_text = request_image(args.image)
    cap = serve_overload.cap_image(image)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = export_model(Path(tmp) / "model", serve_precision.valid_images()[:8] or [image])
        say(f"exported the {IMAGE_SIZE} px model in {time.perf_counter() - began:.1f}s")
        server = Server(model_dir, args.server_log or Path(tmp) / "server.log", main_extra, memory_limit=limit)
        share = CpuShare([lambda: [psutil.Process()], server.procs])
        share.rerun_until = time.monotonic() + (60 if quick else 200)
        try:
            ready_s = share.measure("start to ready", lambda: server.wait_ready(timeout=120))
            ready_rss = server.rss()
            say(f"server ready in {ready_s:.2f}s, {ready_rss / 2**20:.0f} MiB")
            floor = Floor(model_dir, image)
            clients = {
                "floor": floor,
                "rest": RestClient(server.url, image),
                "grpc": GrpcClient(server.grpc_target, image),
                "floor_heatmap": Floor(model_dir, image, "explain_images", loaded=floor.loaded),
                "rest_heatmap": RestClient(server.url, image, HEATMAP_OUTPUTS),
            }
            times, probs = share.measure(
                "sequential (floor, REST, gRPC interleaved)", lambda: interleaved_latency(clients, warmup, sequential)
            )
            say("p50 ms: " + ", ".join(f"{k} {statistics.median(v) * 1000:.0f}" for k, v in times.items()))
            floor_ips = {}
            for b in batch_sizes:
                floor_ips[b] = share.measure_clean(f"floor batch {b}", lambda b=b: floor.throughput(b, min_images))
                say(f"floor: batch {b}: {floor_ips[b]:.2f} images/s")
            loads = {}
            for c in (1, 8, 16):
                loads[c] = share.measure_clean(
                    f"{c} clients", lambda c=c: throughput(server.url, image, c, duration, 200)
                )
                say(
                    f"{c} clients: {loads[c]['ips']:.2f} images/s, {loads[c]['images_per_call']:.1f} images per "
                    f"call, {loads[c]['refused']} refused, {loads[c]['unanswered_clients']} never answered"
                )
            best_b = max(floor_ips, key=lambda b: floor_ips[b])
            recheck = share.measure_clean(f"floor batch {best_b} again", lambda: floor.throughput(best_b, min_images))
            floor_best = max(max(floor_ips.values()), recheck)
            cap_s = floor.seconds(cap)
            say(f"floor again: batch {best_b}: {recheck:.2f} images/s; one pixel-cap image: {cap_s * 1000:.0f} ms")
            for client in clients.values():
                getattr(client, "close", lambda: None)()
            peak_before_overload, server.peak_rss = max(server.peak_rss, server.rss()), 0
            kinds = serve_overload.mix(image, cap, floor_best, cap_s, args.cap_images)
            rejected_before = rejected_by_reason(server.url)
            start = time.perf_counter()
            outcomes, restarts = share.measure(
                "overload", lambda: serve_overload.run(server, kinds, args.overload_clients, overload_s)
            )
            overload_rss = max(server.peak_rss, server.rss())
            over = serve_overload.summarize(outcomes, kinds, start, overload_s, pct(times["rest"], 99))
            over["rejected_by_reason"] = {
                k: int(v - rejected_before.get(k, 0)) for k, v in rejected_by_reason(server.url).items()
            }
            say(f"overload: {over}")
            alive = server.alive()
            peak_rss = max(peak_before_overload, overload_rss)
        except Exception:
            print(f"--- server log ---\n{server.log()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        bf16 = serve_precision.run(
            model_dir,
            Path(tmp) / "server-bf16.log",
            extra,
            floor,
            image,
            best_b,
            share,
            warmup=warmup,
            sequential=sequential,
            duration=duration,
            min_images=min_images,
            memory_limit=limit,
        )
        floor_best = max(floor_best, bf16.floor_best_again)
    if not alive:
        raise RuntimeError("the server was dead at the end of the benchmark")
    max_diff = max(abs(probs[k] - probs["floor"]) for k in ("rest", "grpc", "floor_heatmap", "rest_heatmap"))
    if max_diff > 1e-4:
        raise RuntimeError(f"server answers differ from the in-process model by {max_diff:.2g}")
    report(
        args,
        Run(
            extra=main_extra,
            image_text=image_text,
            times=times,
            floor_ips=floor_ips,
            recheck=recheck,
            best_b=best_b,
            floor_best=floor_best,
            loads=loads,
            ready_s=ready_s,
            ready_rss=ready_rss,
            peak_rss=peak_rss,
            share=share,
            over=over,
            restarts=restarts,
            overload_rss=overload_rss,
            limit=limit,
            cap_s=cap_s,
            warmup=warmup,
            sequential=sequential,
            duration=duration,
            overload_s=overload_s,
            bf16=bf16,
        ),
    )
    return 0


@dataclass
class Run:
    """What the phases measured, for :func:`report`."""

    extra: list[str]  # the main server's flags
    image_text: str
    times: dict[str, list[float]]  # sequential latencies (s) per kind of call
    floor_ips: dict[int, float]  # in-process images/s per batch size
    recheck: float  # the best batch size again, after the load test
    best_b: int
    floor_best: float
    loads: dict[int, dict[str, Any]]  # per number of concurrent clients
    ready_s: float
    ready_rss: float
    peak_rss: float
    share: CpuShare
    over: dict[str, Any]  # the overload phase's summary
    restarts: int
    overload_rss: float
    limit: int  # the pod's memory limit, bytes
    cap_s: float  # one pixel-cap image in process
    warmup: int
    sequential: int
    duration: float
    overload_s: float
    bf16: serve_precision.Bf16Phase


def report(args, r: Run) -> None:
    """Print the tables and checks, write the serving section of docs/benchmarks.md, emit the JSON line."""
    quick = args.quick
    ms = {k: (statistics.median(v) * 1000, pct(v, 99) * 1000) for k, v in r.times.items()}
    (floor_p50, floor_p99), (rest_p50, rest_p99), (grpc_p50, grpc_p99) = ms["floor"], ms["rest"], ms["grpc"]
    (cam_floor_p50, cam_floor_p99), (cam_p50, cam_p99) = ms["floor_heatmap"], ms["rest_heatmap"]
    figures = {
        "floor_p50_ms": round(floor_p50, 1),
        "rest_p50_ms": round(rest_p50, 1),
        "rest_p99_ms": round(rest_p99, 1),
        "grpc_p50_ms": round(grpc_p50, 1),
        "grpc_p99_ms": round(grpc_p99, 1),
        "p50_ratio": round(rest_p50 / floor_p50, 3),
        "floor_best_ips": round(r.floor_best, 2),
        "floor_heatmap_p50_ms": round(cam_floor_p50, 1),
        "rest_heatmap_p50_ms": round(cam_p50, 1),
        "rest_heatmap_p99_ms": round(cam_p99, 1),
        "heatmap_p50_ratio": round(cam_p50 / cam_floor_p50, 3),
        "heatmap_over_plain_p50": round(cam_p50 / rest_p50, 3),
        "floor_best_batch": r.best_b,
        "floor_cap_image_ms": round(r.cap_s * 1000, 1),
        "ips_1": round(r.loads[1]["ips"], 2),
        "ips_8": round(r.loads[8]["ips"], 2),
        "ips_16": round(r.loads[16]["ips"], 2),
        "throughput_ratio_8": round(r.loads[8]["ips"] / r.floor_best, 3),
        "ready_s": round(r.ready_s, 2),
        "rss_mb": round(r.peak_rss / 2**20, 1),
        "rss_ready_mb": round(r.ready_rss / 2**20, 1),
        "images_per_call_8": round(r.loads[8]["images_per_call"], 2),
        "images_per_call_16": round(r.loads[16]["images_per_call"], 2),
        "refused_8": r.loads[8]["refused"],
        "refused_16": r.loads[16]["refused"],
        "unanswered_clients_16": r.loads[16]["unanswered_clients"],
        "overload_restarts": r.restarts,
        "overload_peak_rss_mb": round(r.overload_rss / 2**20, 1),
        "overload_admitted_ratio": round(r.over["admitted_ratio"], 3),
        "overload_reject_p99_ms": round(r.over["reject_p99_ms"], 1),
        "overload_small_p99_ratio": round(r.over["small_p99_ratio"], 2),
        "overload_small_p99_ms": round(r.over["small_p99_ms"], 1),
        "overload_admitted_ips": round(r.over["admitted_ips"], 2),
        "overload_statuses": r.over["statuses"],
        "overload_answered_by_kind": r.over["answered_by_kind"],
        "overload_rejected_by_reason": r.over["rejected_by_reason"],
        "overload_clients": args.overload_clients,
        "overload_seconds": r.overload_s,
        "pod_memory_limit_mb": round(r.limit / 2**20),
        "background_cpu_max": round(max(r.share.phases.values()), 3),
        "quick": quick,
        "server_args": " ".join(r.extra),
        "bf16_precision": r.bf16.precision,
        "bf16_precision_reason": r.bf16.reason,
        "bf16_floor_p50_ms": round(r.bf16.floor_p50_ms, 1),
        "bf16_rest_p50_ms": round(r.bf16.rest_p50_ms, 1),
        "bf16_rest_p99_ms": round(r.bf16.rest_p99_ms, 1),
        "bf16_ips_16": round(r.bf16.ips_16, 2),
        "bf16_p50_ratio": round(r.bf16.rest_p50_ms / r.bf16.floor_p50_ms, 3),
        "bf16_ips_16_ratio": round(r.bf16.ips_16 / r.floor_best, 3),
        "bf16_ready_s": round(r.bf16.ready_s, 2),
        "bf16_inprocess_p50_ms": round(r.bf16.inprocess_p50_ms, 1),
        "bf16_inprocess_ips": round(r.bf16.inprocess_ips, 2),
        "bf16_max_abs_diff": r.bf16.parity.get("max_abs_diff"),
        "bf16_label_flips": r.bf16.parity.get("label_flips"),
        "bf16_parity_images": r.bf16.parity.get("images", 0),
    }
    rows = [["floor: in-process call, 1 image, sequential", floor_p50, floor_p99, 1000 / floor_p50, "", ""]]
    rows += [
        [f"floor: in-process, batches of {b}, back to back", "", "", v, "", round(v / r.floor_best, 3)]
        for b, v in r.floor_ips.items()
    ]
    rows += [
        [
            f"floor: batches of {r.best_b} again, after the load test",
            "",
            "",
            r.recheck,
            "",
            round(r.recheck / r.floor_best, 3),
        ]
    ]
    rows += [
        [
            "chest-ct REST (JSON, base64), sequential",
            rest_p50,
            rest_p99,
            1000 / rest_p50,
            1.0,
            round(1000 / rest_p50 / r.floor_best, 3),
        ],
        [
            "chest-ct gRPC (raw bytes), sequential",
            grpc_p50,
            grpc_p99,
            1000 / grpc_p50,
            1.0,
            round(1000 / grpc_p50 / r.floor_best, 3),
        ],
        [
            "floor with heatmap: in-process explain_images, 1 image, sequential",
            cam_floor_p50,
            cam_floor_p99,
            1000 / cam_floor_p50,
            "",
            round(1000 / cam_floor_p50 / r.floor_best, 3),
        ],
        [
            f"chest-ct REST naming heatmap, sequential ({cam_p50 / rest_p50:.2f}x the plain request's p50)",
            cam_p50,
            cam_p99,
            1000 / cam_p50,
            1.0,
            round(1000 / cam_p50 / r.floor_best, 3),
        ],
    ]
    rows += [
        [
            f"chest-ct REST, {c} concurrent clients ({r.loads[c]['refused']} refused)",
            "",
            "",
            r.loads[c]["ips"],
            round(r.loads[c]["images_per_call"], 2),
            round(r.loads[c]["ips"] / r.floor_best, 3),
        ]
        for c in (1, 8, 16)
    ]
    rows += [
        [
            "bf16 phase: floor (float32), 1 image, interleaved with the two below",
            r.bf16.floor_p50_ms,
            "",
            1000 / r.bf16.floor_p50_ms,
            "",
            "",
        ],
        [
            "reference: the floor's signature in bf16 (oneDNN rewrite), 1 image, interleaved",
            r.bf16.inprocess_p50_ms,
            "",
            1000 / r.bf16.inprocess_p50_ms,
            "",
            "",
        ],
        [
            f"bf16 phase: floor batches of {r.best_b} again",
            "",
            "",
            r.bf16.floor_best_again,
            "",
            round(r.bf16.floor_best_again / r.floor_best, 3),
        ],
        [
            f"reference: the floor's signature in bf16, batches of {r.best_b}",
            "",
            "",
            r.bf16.inprocess_ips,
            "",
            round(r.bf16.inprocess_ips / r.floor_best, 3),
        ],
        [
            f"chest-ct REST --precision bf16 (served: {r.bf16.precision}), sequential",
            r.bf16.rest_p50_ms,
            r.bf16.rest_p99_ms,
            1000 / r.bf16.rest_p50_ms,
            1.0,
            round(1000 / r.bf16.rest_p50_ms / r.floor_best, 3),
        ],
        [
            f"chest-ct REST --precision bf16, 16 concurrent clients ({r.bf16.refused_16} refused)",
            "",
            "",
            r.bf16.ips_16,
            "",
            round(r.bf16.ips_16 / r.floor_best, 3),
        ],
    ]
    text = table(["what", "p50 ms", "p99 ms", "images/s", "images per model call", "x floor best images/s"], rows)
    text += "\n\n" + table(
        ["server", "value"],
        [
            ["start to ready (spawn -> /v2/health/ready 200), s", r.ready_s],
            ["resident memory at ready, MiB", r.ready_rss / 2**20],
            ["peak resident memory (whole run, incl. load), MiB", r.peak_rss / 2**20],
        ],
    )
    text += "\n\n" + table(
        ["overload", "value"],
        [
            [
                f"clients x seconds (mix: 90% 1 image, 5% 64 images, 5% {args.cap_images} at the pixel cap)",
                f"{args.overload_clients} x {r.overload_s:.0f}",
            ],
            ["requests in the window, by status", json.dumps(r.over["statuses"])],
            ["answered (200) in the window, by kind", json.dumps(r.over["answered_by_kind"])],
            ["refused (503) during the phase, by reason", json.dumps(r.over["rejected_by_reason"])],
            ["restarts (died, or killed at the pod's memory limit)", r.restarts],
            [f"peak resident memory, MiB (pod limit {r.limit / 2**20:.0f})", r.overload_rss / 2**20],
            ["admitted work, x floor best", r.over["admitted_ratio"]],
            ["admitted images/s (a pixel-cap image counts 1)", r.over["admitted_ips"]],
            [f"one pixel-cap image in process, ms (small image: {1000 / r.floor_best:.0f})", r.cap_s * 1000],
            ["refusals (503), p99 ms", r.over["reject_p99_ms"]],
            ["answered one-image requests, p99 ms", r.over["small_p99_ms"]],
            ["... over the unloaded REST p99", r.over["small_p99_ratio"]],
        ],
    )
    background = "; ".join(f"{name} {100 * v:.0f}%" for name, v in r.share.phases.items())
    if r.share.reruns:
        background += f" (measured twice because of background load, the cleaner run kept: {', '.join(r.share.reruns)})"

    def check(name: str, ok: bool, shown: str) -> str:
        return f"{name} ({shown}): {'met' if ok else 'MISSED'}"

    rss_share = r.overload_rss / r.limit
    checks = [
        check("p50 <= 1.10x floor", figures["p50_ratio"] <= TARGETS["p50_ratio"], f"{figures['p50_ratio']}x"),
        check("p99 <= 1.5x p50", rest_p99 <= TARGETS["p99_over_p50"] * rest_p50, f"{rest_p99 / rest_p50:.2f}x"),
        check(
            "with heatmap: p50 <= 1.10x its floor (explain_images)",
            figures["heatmap_p50_ratio"] <= TARGETS["heatmap_p50_ratio"],
            f"{figures['heatmap_p50_ratio']}x",
        ),
        check(
            "8 clients >= 0.9x floor throughput",
            figures["throughput_ratio_8"] >= TARGETS["throughput_ratio_8"],
            f"{figures['throughput_ratio_8']}x",
        ),
        check("ready <= 8 s", r.ready_s <= TARGETS["ready_s"], f"{r.ready_s:.2f} s"),
        check("memory <= 1.5 GB", r.peak_rss / 2**20 <= TARGETS["rss_mb"], f"{r.peak_rss / 2**20:.0f} MiB"),
        check("overload: no restart", r.restarts == 0, str(r.restarts)),
        check(
            "overload: peak memory < 80% of the pod limit",
            rss_share < TARGETS["overload_rss_share"],
            f"{100 * rss_share:.0f}%",
        ),
        check(
            "overload: admitted >= 0.9x floor",
            r.over["admitted_ratio"] >= TARGETS["overload_admitted_ratio"],
            f"{r.over['admitted_ratio']:.3f}x",
        ),
        check(
            "overload: refusals p99 <= 50 ms",
            r.over["reject_p99_ms"] <= TARGETS["overload_reject_p99_ms"],
            f"{r.over['reject_p99_ms']:.1f} ms",
        ),
        check(
            "overload: one-image p99 <= 3x unloaded",
            r.over["small_p99_ratio"] <= TARGETS["overload_small_p99_ratio"],
            f"{r.over['small_p99_ratio']:.2f}x",
        ),
        check("bf16: served in bf16 (golden set agreed)", r.bf16.precision == "bf16", r.bf16.precision),
        check(
            "bf16: 16 clients >= 1.7x the fp32 floor's best",
            figures["bf16_ips_16_ratio"] >= TARGETS["bf16_ips_16_ratio"],
            f"{figures['bf16_ips_16_ratio']}x",
        ),
        check(
            "bf16: p50 <= 0.65x the fp32 floor",
            figures["bf16_p50_ratio"] <= TARGETS["bf16_p50_ratio"],
            f"{figures['bf16_p50_ratio']}x",
        ),
        check(
            f"bf16: within 0.01 of fp32, no label flip ({figures['bf16_parity_images']} valid images)",
            bool(r.bf16.parity)
            and r.bf16.parity["max_abs_diff"] <= TARGETS["bf16_max_abs_diff"]
            and r.bf16.parity["label_flips"] == TARGETS["bf16_label_flips"],
            f"max {figures['bf16_max_abs_diff']}, {figures['bf16_label_flips']} flips",
        ),
    ]
    verdict = "targets: " + "; ".join(checks)
    print(text)
    print(f"CPU taken by other processes on this machine, per phase: {background}")
    print(verdict)
    if not args.no_write:
        settings = " ".join(r.extra) or "server defaults"
        write_section(
            "serve",
            (
                f"## Serving ({IMAGE_SIZE} px SavedModel, random weights; KServe v2 on loopback, {settings}"
                f"{'; QUICK run' if quick else ''})\n\n"
                f"Machine: {machine()}\n\nImage: {r.image_text}. Sequential: {r.sequential} rounds after {r.warmup} "
                "warm-up "
                "calls, each round one floor call, one REST request, one gRPC request, one explain_images call and one "
                "REST request naming the opt-in heatmap (interleaved so background load hits them alike; requests that "
                "name no outputs run the predict signature only). "
                f"Concurrent: REST, {r.duration:.0f} s per level, steady state (completions after every "
                "client's first answer); a refused request is sent again after 0.1 s. Overload: "
                f"{args.overload_clients} REST clients for {r.overload_s:.0f} s, waiting the Retry-After (+-25%) "
                "after a "
                "503; figures over the window from 5 s to the end; admitted work counts each answered request's images "
                "at what the in-process model needs for them, spread over the request's duration. The main server runs "
                "float32 (--precision fp32). bf16 phase: a second server with --precision bf16; sequential REST "
                "requests interleaved with float32 floor calls, 16 clients, and each shared valid image once against "
                "the floor's float32 answer (random weights: all probabilities sit near 0.4, far from the 0.5 "
                "threshold, so "
                "label flips are only meaningful in bench.train's trained-model figure).\n\n"
                f"{text}\n\n{verdict}\n\n"
                f"Server overhead per request over the in-process call (p50): REST {rest_p50 - floor_p50:+.1f} ms, "
                f"gRPC {grpc_p50 - floor_p50:+.1f} ms.\n\n"
                f"CPU taken by other processes on this machine, per phase: {background}.\n\n"
                "Caveats: the load generator (Python threads, one persistent connection each, request bodies encoded "
                f"once) runs on the same {os.cpu_count()} cores as the server and takes CPU from it, while the floor "
                "runs alone, so the server's figures are pessimistic, the overload phase's most of all. The model has "
                "random weights (same speed as trained ones).\n\n"
                f"```json\n{json.dumps(figures)}\n```"
            ),
        )
    emit(figures)


if __name__ == "__main__":
    sys.exit(main())
