"""The overload phase of ``bench.serve``: many clients, a mix of small, large and pixel-cap requests.

Each client picks, per request (seeded): one image (90%), 64 images (5%) or
``cap_images`` images of 4096 x 4096, the pixel cap (5%). Clients are polite the
way a retrying client is: after a 503 they wait the server's Retry-After (+-25%
jitter) before sending again; after a connection error, one second.

The server runs under the pod's memory limit as the kubelet would enforce it:
passing it kills the process (``bench.serve_process``), which is then started
again; ``restarts`` counts that and any other death.

Figures, over the window from 5 s after the start to the end of the phase:

- ``admitted_ratio``: useful model work answered per second, in seconds of the
  floor's best in-process throughput (a small image costs 1 / floor images/s, a
  pixel-cap image what one in-process call on it costs), so 1.0 means the
  server answered as much work as the bare model could do back to back. A
  request's work is spread evenly over its duration, so long requests at the
  window's edges count only their share;
- ``reject_p99_ms``: 99th percentile of the time a refused (503) request took;
- ``small_p99_ratio``: p99 latency of answered one-image requests over the
  unloaded REST p99 measured in the same run.
"""

from __future__ import annotations

import io
import random
import threading
import time
from dataclasses import dataclass

from bench.report import pct
from bench.serve_clients import RestClient, image_body
from bench.serve_process import Server

WARMUP_S = 5.0


@dataclass(frozen=True)
class Kind:
    name: str
    body: bytes
    images: int
    floor_seconds: float  # what the bare model needs for this request's images
    share: float  # fraction of requests


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int  # 0: no answer (connection error)
    start: float
    end: float


def cap_image(image: bytes, side: int = 4096) -> bytes:
    """``image`` scaled to side x side (the default pixel cap) with nearest-neighbour: a PNG that decodes to
    50 MB in RGB but compresses well, like the ones the issue measured."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        big = img.convert("L").resize((side, side), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    return buffer.getvalue()


def mix(image: bytes, cap: bytes, floor_best_ips: float, cap_seconds: float, cap_images: int) -> list[Kind]:
    return [
        Kind("small", image_body([image]), 1, 1 / floor_best_ips, 0.90),
        Kind("large", image_body([image] * 64), 64, 64 / floor_best_ips, 0.05),
        Kind("cap", image_body([cap] * cap_images), cap_images, cap_images * cap_seconds, 0.05),
    ]


def run(server: Server, kinds: list[Kind], clients: int, duration: float, seed: int = 0) -> tuple[list[Outcome], int]:
    """Drive the server for ``duration`` seconds; return every request's outcome and the restart count."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration
    restarts = 0
    done = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        session = RestClient(server.url)
        try:
            while time.perf_counter() < stop_at:
                draw, kind = rng.random(), kinds[-1]
                for candidate in kinds:
                    if draw < candidate.share:
                        kind = candidate
                        break
                    draw -= candidate.share
                start = time.perf_counter()
                try:
                    status, headers, _ = session.post(kind.body, timeout=180)
                except Exception:  # noqa: BLE001  (the server died or restarts: counted, then wait)
                    status, headers = 0, {}
                end = time.perf_counter()
                with lock:
                    outcomes.append(Outcome(kind.name, status, start, end))
                if status == 503:
                    time.sleep(float(headers.get("retry-after", 1)) * rng.uniform(0.75, 1.25))
                elif status == 0:
                    time.sleep(1.0)
        finally:
            session.close()

    def watch() -> None:
        nonlocal restarts
        while not done.wait(0.2):
            if not server.alive():
                restarts += 1
                server.respawn()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 300)
    done.set()
    watcher.join(130)
    return outcomes, restarts


def _p99(values: list[float]) -> float:
    return pct(values, 99) if values else float("nan")


def summarize(outcomes: list[Outcome], kinds: list[Kind], start: float, duration: float, unloaded_p99_s: float) -> dict:
    """The phase's figures (see the module docstring) from its outcomes; times are time.perf_counter()."""
    lo, hi = start + WARMUP_S, start + duration
    work = {k.name: k.floor_seconds for k in kinds}
    images = {k.name: k.images for k in kinds}
    useful = admitted_images = 0.0
    for o in outcomes:
        if o.status != 200:
            continue
        overlap = max(0.0, min(o.end, hi) - max(o.start, lo))
        share = overlap / (o.end - o.start) if o.end > o.start else float(lo <= o.end <= hi)
        useful += work[o.kind] * share
        admitted_images += images[o.kind] * share
    window = [o for o in outcomes if lo <= o.start <= hi]
    small_ok = [o.end - o.start for o in window if o.kind == "small" and o.status == 200]
    refused = [o.end - o.start for o in window if o.status == 503]
    counts = {status: sum(1 for o in window if o.status == status) for status in sorted({o.status for o in window})}
    by_kind = {k.name: sum(1 for o in window if o.kind == k.name and o.status == 200) for k in kinds}
    return {
        "admitted_ratio": useful / (hi - lo),
        "admitted_ips": admitted_images / (hi - lo),
        "reject_p99_ms": _p99(refused) * 1000,
        "small_p99_ms": _p99(small_ok) * 1000,
        "small_p99_ratio": _p99(small_ok) / unloaded_p99_s,
        "statuses": counts,
        "answered_by_kind": by_kind,
        "requests": len(window),
    }
