"""Run CPU-bound work on every core the container is given, with progress, and without losing items to crashes.

Why processes, and why forkserver: validation decodes with TensorFlow, and TensorFlow
costs seconds and ~660 MB to import. A forkserver imports it once (``preload``) and
forks the workers from that state, so starting a worker takes milliseconds and its
private memory is ~15 MB instead of ~300 MB; the parent, which never imports
TensorFlow, stays small. The forkserver never runs a TensorFlow op, so forking it is
as safe as any fork after ``import numpy``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

DEFAULT_PROGRESS_EVERY_S = 5.0
MAX_CHUNK = 64  # items per task: amortises inter-process overhead, keeps progress and crash retries fine-grained


class WorkerStartError(RuntimeError):
    """Worker processes cannot start (not a problem of the items they were given)."""


def available_cpus() -> int:
    """CPUs this process may use: the least of the machine's count, the CPU affinity mask,
    the container's CPU limit and ``LOKY_MAX_CPU_COUNT``.

    joblib (loky) reads the limit from cgroup v2 (``/sys/fs/cgroup/cpu.max``) and falls back
    to cgroup v1 (``/sys/fs/cgroup/cpu/cpu.cfs_quota_us / cpu.cfs_period_us``), rounding a
    fractional limit up (``joblib/externals/loky/backend/context.py``, joblib 1.6). Those are
    the container's own files where the runtime gives it its cgroup at /sys/fs/cgroup
    (Kubernetes and Docker do). ``os.cpu_count()`` alone would see every core of the node
    and oversubscribe a pod limited to a few.
    """
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")
    )


class Progress:
    """Logs ``<what>: done/total (rate/s, ETA ...)`` at most every ``every_s`` seconds.

    Short runs log nothing until :meth:`finish`, which logs one summary line when at
    least one progress line was logged (so long runs end with their totals).
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        every_s: float = DEFAULT_PROGRESS_EVERY_S,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.every_s, self.logger, self.clock = what, total, every_s, logger, clock
        self.done = 0
        self.start = self.last = clock()
        self.lines = 0

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.lines += 1
            rate = self.done / max(now - self.start, 1e-9)
            self.logger.info(
                "%s: %d/%d (%.0f/s, ETA %s)",
                self.what,
                self.done,
                self.total,
                rate,
                _eta((self.total - self.done) / max(rate, 1e-9)),
            )

    def finish(self) -> None:
        if self.lines:
            elapsed = self.clock() - self.start
            self.logger.info(
                "%s: %d/%d in %s (%.0f/s)",
                self.what,
                self.done,
                self.total,
                _eta(elapsed),
                self.done / max(elapsed, 1e-9),
            )


def worker_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """A forkserver context that imports ``preload`` once in the server (spawn where there is no forkserver).

    The preload list only takes effect when this process starts its forkserver; a
    forkserver started earlier with another list still works, each worker then imports
    what it needs itself.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*_main_module(), *preload])
    return ctx


def _main_module() -> list[str]:
    """Workers re-run the parent's main module (as spawn does): preload what makes that cheap.

    A script is imported by the server and then skipped by the workers; for ``python -m
    pkg.mod`` the server imports ``pkg`` (importing ``pkg.mod`` itself would make runpy warn
    in every worker when it runs the module again).
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name:
        package = name.rpartition(".")[0]
        return [package] if package and not name.endswith(".__main__") else []
    return ["__main__"] if getattr(main, "__file__", None) else []


def chunk_size_for(n_items: int, workers: int) -> int:
    """About eight tasks per worker, at most :data:`MAX_CHUNK` items each."""
    return max(1, min(MAX_CHUNK, math.ceil(n_items / (8 * max(1, workers)))))


def process_map(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    *,
    workers: int,
    on_crash: Callable[[T], R],
    chunk_size: int | None = None,
    preload: Sequence[str] = (),
    initializer: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> list[R]:
    """``fn`` over ``items`` in chunks on ``workers`` processes; results in input order.

    ``fn`` takes a list of items and returns one result per item; it must be a
    module-level function (or a ``functools.partial`` of one). A worker that dies (a
    decoder segfault, the kernel's OOM killer) breaks the pool: the chunks that were in
    flight are then re-run one item at a time in a fresh single worker, and each item
    that kills its worker again gets ``on_crash(item)`` instead of a result. Other
    exceptions raised by ``fn`` propagate: they are bugs, not bad input.
    """
    items = list(items)
    if not items:
        return []
    chunk_size = chunk_size or chunk_size_for(len(items), workers)
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    results: list[list[R] | None] = [None] * len(chunks)
    ctx = worker_context(preload)
    pending = deque(range(len(chunks)))
    while pending:
        for cid in _run_until_broken(
            fn, chunks, pending, results, min(workers, len(chunks)), ctx, initializer, progress
        ):
            log.warning(
                "a worker process died while handling %d items; re-running them one at a time", len(chunks[cid])
            )
            results[cid] = _isolate(fn, chunks[cid], ctx, initializer, on_crash)
            if progress:
                progress.update(len(chunks[cid]))
    return [r for chunk in results for r in chunk]  # type: ignore[union-attr]


def _run_until_broken(
    fn, chunks, pending: deque, results: list, workers: int, ctx, initializer, progress: Progress | None
) -> list[int]:
    """Run pending chunks with at most 2 per worker in flight; return the chunks lost when the pool broke."""
    in_flight: dict[Future, int] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer) as pool:
        try:
            while pending or in_flight:
                while pending and len(in_flight) < 2 * workers:
                    in_flight[pool.submit(fn, chunks[pending[0]])] = pending[0]
                    pending.popleft()
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    try:
                        results[in_flight[future]] = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    cid = in_flight.pop(future)
                    if progress:
                        progress.update(len(chunks[cid]))
                if broken:
                    return sorted(in_flight.values())
        except BrokenProcessPool:  # raised by submit() when the pool broke in between
            return sorted(in_flight.values())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return []


def _isolate(fn, items: list, ctx, initializer, on_crash) -> list:
    """Run ``items`` one by one in a single worker, replacing it whenever an item kills it.

    Each fresh worker first runs a no-op: when even that fails, workers cannot start
    at all, and blaming the items would quarantine a whole dataset for nothing.
    """
    out = []
    pool = None
    try:
        for item in items:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=initializer)
                try:
                    pool.submit(_noop).result()
                except BrokenProcessPool as exc:
                    raise WorkerStartError(
                        "worker processes die before doing any work (see the log above for their error; "
                        'a script that starts them needs an `if __name__ == "__main__":` guard)'
                    ) from exc
            try:
                out.append(pool.submit(fn, [item]).result()[0])
            except BrokenProcessPool:
                out.append(on_crash(item))
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool:
            pool.shutdown(wait=True)
    return out


def _noop() -> None:
    return None
