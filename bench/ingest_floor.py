"""bench.ingest, part 3: the floor (read + sha256 + decode on a warm pool) and the memory of a process tree."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.report import timed


def floor_chunk(paths: list[str]) -> int:
    """The floor's work per file: read once, sha256, decode with the model's decoder."""
    from chest_ct.preprocess import decode

    for path in paths:
        data = Path(path).read_bytes()
        hashlib.sha256(data).hexdigest()
        decode(data).numpy()
    return len(paths)


def floor_phash_chunk(paths: list[str]) -> int:
    """The floor plus the perceptual hash: the least a validation that finds near copies can do."""
    import imagehash
    import numpy as np
    from PIL import Image

    from chest_ct.preprocess import decode

    for path in paths:
        data = Path(path).read_bytes()
        hashlib.sha256(data).hexdigest()
        pixels = decode(data).numpy()
        str(imagehash.phash(Image.fromarray(np.ascontiguousarray(pixels[..., 0]), "L")))
    return len(paths)


def run_floor(fn, files: list[str], workers: int) -> float:
    from chest_ct.images import WORKER_PRELOAD, _init_worker
    from chest_ct.parallel import chunk_size_for, worker_context

    size = chunk_size_for(len(files), workers)
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    with ProcessPoolExecutor(workers, mp_context=worker_context(WORKER_PRELOAD), initializer=_init_worker) as pool:
        list(pool.map(floor_chunk, chunks[:workers]))  # workers forked and warm, as the ingest's are
        seconds, done = timed(lambda: sum(pool.map(fn, chunks)))
    assert done == len(files)
    return seconds


class TreeMemory:
    """Peak memory of this process and all its children (forkserver, workers), sampled in a thread."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.peak_pss = self.peak_rss_sum = self.peak_parent_rss = 0.0
        self.at_peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        pss = rss = 0
        parts = {"ingest process": 0.0, "forkserver": 0.0, "workers": 0.0}
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                role = (
                    "ingest process"
                    if proc.pid == me.pid
                    else "forkserver"
                    if "forkserver" in " ".join(proc.cmdline())
                    else "workers"
                )
            except self.psutil.Error:
                continue
            pss += info.pss
            rss += info.rss
            parts[role] += info.pss / 2**20
        if pss / 2**20 > self.peak_pss:
            self.at_peak = parts
        self.peak_pss = max(self.peak_pss, pss / 2**20)
        self.peak_rss_sum = max(self.peak_rss_sum, rss / 2**20)
        self.peak_parent_rss = max(self.peak_parent_rss, me.memory_info().rss / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
