"""The reduced-precision phase of ``bench.serve``: a second server started with ``--precision bf16``.

Measured against the same float32 floor as the rest of the run (the SavedModel called
in this process, float32):

- sequential single-image REST requests to the bf16 server interleaved round by round
  with float32 floor calls and, for reference, the floor's signature in bf16 (the same
  in-process function under oneDNN's rewrite, switched on for its call only):
  ``bf16_p50_ratio`` = bf16 REST p50 / float32 floor p50 of those rounds;
- 16 concurrent REST clients: ``bf16_ips_16_ratio`` = images/s / the floor's best
  throughput (the best of the main phase's sweep and a re-measurement here);
- the shared valid images, one request each, against the floor's float32 answers:
  ``bf16_max_abs_diff`` and ``bf16_label_flips`` at the model's threshold;
- for reference, the floor's best batch size in bf16, in process.

The server must report ``precision: bf16`` in its metadata (its golden set agreed);
otherwise the phase says it fell back and why.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import SHARED_DATA, pct
from bench.serve_clients import RestClient, interleaved_latency, throughput
from bench.serve_floor import CpuShare, Floor, say
from bench.serve_process import MODEL_NAME, Server


@dataclass
class Bf16Phase:
    precision: str
    reason: str
    ready_s: float
    floor_p50_ms: float
    rest_p50_ms: float
    rest_p99_ms: float
    ips_16: float
    refused_16: int
    floor_best_again: float
    inprocess_p50_ms: float
    inprocess_ips: float
    parity: dict = field(default_factory=dict)


class Bf16Floor:
    """The floor's signature with oneDNN's bf16 rewrite on for each call (TensorFlow caches both versions)."""

    def __init__(self, floor: Floor):
        from chest_ct.golden import KEEP_FLOAT32_OPS
        from chest_ct.precision import onednn_bf16

        self.floor, self._context = floor, lambda: onednn_bf16(KEEP_FLOAT32_OPS)

    def infer(self) -> float:
        with self._context():
            return self.floor.infer()

    def throughput(self, b: int, min_images: int) -> float:
        with self._context():
            return self.floor.throughput(b, min_images)


def valid_images() -> list[bytes]:
    """The shared valid images (both classes), or none when the data is absent."""
    return [
        p.read_bytes()
        for p in sorted((SHARED_DATA / "valid").glob("*/*"))
        if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    ]


def run(
    model_dir: Path,
    log_path: Path,
    extra: list[str],
    floor: Floor,
    image: bytes,
    best_b: int,
    share: CpuShare,
    *,
    warmup: int,
    sequential: int,
    duration: float,
    min_images: int,
    memory_limit: int | None,
) -> Bf16Phase:
    import requests

    from chest_ct.export import read_metadata
    from serving.precision import parity

    server = Server(model_dir, log_path, [*extra, "--precision", "bf16"], memory_limit=memory_limit)
    share.track(server.procs)
    try:
        ready_s = share.measure("bf16: start to ready", lambda: server.wait_ready(timeout=120))
        params = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()["parameters"]
        say(f"bf16 server ready in {ready_s:.2f}s: precision {params['precision']} ({params['precision_reason']})")
        rest, floor_bf16 = RestClient(server.url, image), Bf16Floor(floor)
        clients = {"floor": floor, "floor_bf16": floor_bf16, "rest": rest}
        times, _ = share.measure(
            "bf16: sequential (floor fp32, floor bf16, REST bf16 interleaved)",
            lambda: interleaved_latency(clients, warmup, sequential),
        )
        load = share.measure_clean("bf16: 16 clients", lambda: throughput(server.url, image, 16, duration, 200))
        again = share.measure_clean(
            f"floor batch {best_b} again (bf16 phase)", lambda: floor.throughput(best_b, min_images)
        )
        say(f"bf16 server, 16 clients: {load['ips']:.2f} images/s; floor batch {best_b} again: {again:.2f}")
        images = valid_images()
        reference = [floor.probability(i) for i in images]
        reduced = [rest.probability(i) for i in images]
        check = parity(reference, reduced, read_metadata(model_dir)["threshold"], 0.01).to_dict() if images else {}
        rest.close()
        inprocess_ips = share.measure_clean(
            f"floor batch {best_b} in bf16", lambda: floor_bf16.throughput(best_b, min_images)
        )
    finally:
        server.stop()
    return Bf16Phase(
        precision=params["precision"],
        reason=params["precision_reason"],
        ready_s=ready_s,
        floor_p50_ms=statistics.median(times["floor"]) * 1000,
        rest_p50_ms=statistics.median(times["rest"]) * 1000,
        rest_p99_ms=pct(times["rest"], 99) * 1000,
        ips_16=load["ips"],
        refused_16=load["refused"],
        floor_best_again=again,
        inprocess_p50_ms=statistics.median(times["floor_bf16"]) * 1000,
        inprocess_ips=inprocess_ips,
        parity=check,
    )
