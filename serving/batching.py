"""Run model calls off the event loop and merge concurrent requests into one batch.

TensorFlow calls block, so they run in one dedicated thread: the event loop
stays free to answer health checks and to parse/validate other requests while
the model works, and on a small CPU allocation the calls do not fight over
cores. Requests that arrive while the model is busy queue up and are merged
into one call of up to ``max_batch_size`` images (server-side dynamic
batching); ``max_wait_s`` > 0 additionally holds a lone request that long for
company. Only requests of the same kind are merged: encoded images with
encoded images, pixel tensors with pixel tensors of the same height and width.

If a merged call fails because of one request's data, each request is re-run
alone so only the offending request gets the error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
from prometheus_client import Histogram

from serving.runner import SavedModelRunner

BATCH_IMAGES = Histogram(
    "chest_ct_model_call_images",
    "Images per SavedModel call after merging concurrent requests",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
BATCH_REQUESTS = Histogram(
    "chest_ct_model_call_requests",
    "Requests merged into one SavedModel call",
    buckets=(1, 2, 4, 8, 16, 32),
)


@dataclass
class _Job:
    key: Hashable
    payload: Any  # list[bytes] or float32 ndarray [n, H, W, 3]
    size: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class BatchingEngine:
    """``await engine.images(list_of_bytes)`` / ``await engine.pixels(array)`` -> float32 probabilities."""

    def __init__(self, runner: SavedModelRunner, max_batch_size: int = 8, max_wait_s: float = 0.0):
        self._runner = runner
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def images(self, encoded: Sequence[bytes]) -> np.ndarray:
        return await self._submit(("image",), list(encoded), len(encoded))

    async def pixels(self, pixels: np.ndarray) -> np.ndarray:
        return await self._submit(("pixels", pixels.shape[1], pixels.shape[2]), pixels, len(pixels))

    async def _submit(self, key: Hashable, payload: Any, size: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="chest-ct-batcher")
        job = _Job(key, payload, size, loop.create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_company()
            jobs = self._take_batch()
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as exc:  # never let the worker die: hand the error to the callers
                results = [exc] * len(jobs)
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # the caller went away (client disconnected)
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _wait_for_company(self) -> None:
        """Hold the oldest request up to ``max_wait_s`` while its batch is not full."""
        if self.max_wait_s <= 0:
            return
        first = self._pending[0]
        while True:
            queued = sum(j.size for j in self._pending if j.key == first.key)
            remaining = first.enqueued + self.max_wait_s - time.monotonic()
            if queued >= self.max_batch_size or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        """The oldest live request plus later ones of the same kind while they fit in ``max_batch_size``."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        jobs, total, rest = [first], first.size, deque()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():
                continue
            if job.key == first.key and total + job.size <= self.max_batch_size:
                jobs.append(job)
                total += job.size
            else:
                rest.append(job)
        self._pending = rest
        return jobs

    def _run(self, jobs: list[_Job]) -> list[Any]:
        """In the model thread: one call for all jobs; on failure, each job alone."""
        BATCH_IMAGES.observe(sum(j.size for j in jobs))
        BATCH_REQUESTS.observe(len(jobs))
        try:
            probs = self._call(jobs[0].key, [j.payload for j in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            return [self._run_alone(job) for job in jobs]
        bounds = np.cumsum([0] + [j.size for j in jobs])
        return [probs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def _run_alone(self, job: _Job) -> Any:
        try:
            return self._call(job.key, [job.payload])
        except Exception as exc:
            return exc

    def _call(self, key: Hashable, payloads: list[Any]) -> np.ndarray:
        if key[0] == "image":
            return self._runner.predict_images([b for p in payloads for b in p])
        return self._runner.predict_pixels(payloads[0] if len(payloads) == 1 else np.concatenate(payloads))
