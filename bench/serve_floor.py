"""The reference side of ``bench.serve``: the model exported for the run, the request image, the in-process
floor, and the share of the CPU other processes took during each phase."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

from bench.report import SHARED_DATA

IMAGE_SIZE = 224


def request_image(path: Path | None) -> tuple[bytes, str]:
    """The encoded PNG the benchmark sends, and a description of it."""
    from PIL import Image

    if path is None:
        found = sorted((SHARED_DATA / "valid" / "adenocarcinoma").glob("*.png"))
        path = found[0] if found else None
    if path is not None:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            shape = f"{img.width}x{img.height} {img.mode} {img.format}"
        return data, f"{Path(path).name} ({shape}, {len(data) // 1024} KiB)"
    import numpy as np

    yy, xx = np.mgrid[0:512, 0:512]
    rng = np.random.default_rng(0)
    gray = (128 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + rng.normal(0, 8, (512, 512))).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.uint8), "L").save(buffer, "PNG")
    data = buffer.getvalue()
    return data, f"generated 512x512 grayscale PNG ({len(data) // 1024} KiB)"


def export_model(out_dir: Path, golden: list[bytes]) -> Path:
    """A random-weight model whose guard is fitted on shifted copies of the benchmark picture, with a golden
    set of ``golden`` (encoded images) so a bf16 server may start."""
    import tempfile

    import numpy as np
    from PIL import Image

    from chest_ct.export import export_saved_model
    from chest_ct.golden import write_golden_set
    from chest_ct.model import build_model
    from chest_ct.ood import block_features, fit_guard

    model = build_model(IMAGE_SIZE, "none")
    image = np.asarray(Image.open(io.BytesIO(request_image(None)[0])).convert("RGB"))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for shift in range(12):
            files.append(f"{tmp}/{shift}.png")
            Image.fromarray(np.roll(image, 20 * shift, axis=shift % 2)).save(files[-1])
        guard = fit_guard(block_features(model, files, IMAGE_SIZE, 4), list(range(len(files))))
    export_saved_model(model, out_dir, {"mlflow_run_id": "bench"}, guard=guard)
    write_golden_set(out_dir, golden, f"{len(golden)} benchmark images")
    return out_dir


class Floor:
    """The SavedModel's ``serving_default`` (or ``signature``) called in this process on the encoded image.

    ``loaded``: the SavedModel already loaded by another Floor (one copy of the weights for both signatures).
    """

    def __init__(self, model_dir: Path, image: bytes, signature: str = "serving_default", loaded=None):
        import tensorflow as tf

        self._tf = tf
        self.loaded = loaded if loaded is not None else tf.saved_model.load(str(model_dir))
        self._fn = self.loaded.signatures[signature]
        self._one = tf.constant([image])
        self.image = image

    def infer(self) -> float:
        return float(self._fn(images=self._one)["probability"].numpy()[0])

    def probability(self, image: bytes) -> float:
        return float(self._fn(images=self._tf.constant([image]))["probability"].numpy()[0])

    def throughput(self, b: int, min_images: int) -> float:
        """Images/s calling with batches of ``b`` (after one warm-up call: oneDNN builds primitives per shape)."""
        batch = self._tf.constant([self.image] * b)
        self._fn(images=batch)["probability"].numpy()
        done, start = 0, time.perf_counter()
        while done < min_images or done == 0:
            self._fn(images=batch)["probability"].numpy()
            done += b
        return done / (time.perf_counter() - start)

    def seconds(self, image: bytes, repeats: int = 3) -> float:
        """Best time of one call on ``image`` alone (after a warm-up call)."""
        one = self._tf.constant([image])
        self._fn(images=one)["probability"].numpy()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self._fn(images=one)["probability"].numpy()
            best = min(best, time.perf_counter() - start)
        return best


class CpuShare:
    """Share of the machine's CPU time used by processes other than this benchmark and the server, per phase.

    The machine may be shared (other jobs, other engineers' tests); this says how much they took.
    """

    def __init__(self, own: list):
        import psutil

        self._psutil = psutil
        self._own = own  # callables returning psutil.Process lists
        self.phases: dict[str, float] = {}
        self.reruns: list[str] = []
        self.rerun_until = float("inf")  # no re-runs after this time.monotonic(): keeps the run bounded

    def track(self, procs) -> None:
        """Count ``procs()`` (a callable returning psutil.Process lists) as this benchmark's own CPU too."""
        self._own.append(procs)

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def _ours(self) -> float:
        total = 0.0
        for get in self._own:
            for proc in get():
                try:
                    c = proc.cpu_times()
                    total += c.user + c.system
                except self._psutil.Error:
                    pass
        return total

    def measure(self, name: str, fn):
        busy, ours, start = self._busy(), self._ours(), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
        other = (self._busy() - busy) - (self._ours() - ours)
        self.phases[name] = max(0.0, other) / (wall * (os.cpu_count() or 1))
        return out

    def measure_clean(self, name: str, fn, limit: float = 0.10):
        """``measure``, run once more when other processes took over ``limit`` of the CPU; the cleaner run counts.

        Applied alike to floor and server measurements.
        """
        out = self.measure(name, fn)
        if self.phases[name] <= limit or time.monotonic() > self.rerun_until:
            return out
        first = self.phases[name]
        say(f"{name}: other processes took {100 * first:.0f}% of the CPU; measuring again")
        again = self.measure(name, fn)
        self.reruns.append(name)
        if self.phases[name] <= first:
            return again
        self.phases[name] = first
        return out


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
