"""Model calls: one thread, fed by a queue of chunk-sized jobs that take turns and merge.

(Over 300 lines: the queue, the turns, merging, failure isolation and the watchdog share one state,
the queue and the running call; split apart, each piece would reach into the others' internals.)

TensorFlow calls block, so they run in one dedicated thread: the event loop stays
free to answer health checks and to parse, validate and refuse other requests.

- **Chunks.** A request is cut into chunks of at most ``max_batch_size`` images
  and ``max_call_pixels`` decoded pixels (one image over the pixel budget still
  gets a chunk of its own), so no single model call allocates activations or
  decoded images for a whole large request.
- **Turns.** Each request has at most one chunk in the queue. When that chunk goes
  into a model call, the request's next chunk joins the *back* of the queue, so
  requests take turns: a one-image request waits for one chunk of each request
  ahead of it, never for all 64 images of a large one (no head-of-line blocking).
- **Merging.** A call takes queued chunks of the same kind (encoded images with
  encoded images, pixel tensors of one height and width together; chunks that
  asked for the heatmap run the explain signature, so they merge only with each
  other) in queue order while they fit in ``max_batch_size`` and
  ``max_call_pixels``; ``max_wait_s`` > 0 holds a lone chunk that long for company.
- **Results** go back to each request in order; every chunk must get exactly as
  many results as images it sent, and every request as many as it asked for.
- **Failures.** If a merged call fails on input (TensorFlow cannot decode one
  request's image), each chunk is re-run alone so only that request gets the
  error; any other failure (out of memory, internal errors) is not retried and
  fails the call's requests with an id that finds the traceback in the log.
  The loop survives any exception, so later requests are still served.
- **Watchdog.** ``stalled_for()`` says how long the running call has exceeded
  ``call_timeout_s``; the model reports not ready while it is positive.
- **Pace.** Model seconds per image, a moving average per signature family
  (predict, explain), feeds admission's deadline estimate and Retry-After.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from kserve.logging import logger

from serving import metrics
from serving.errors import InternalError
from serving.runner import ModelInputError, SavedModelRunner


@dataclass(frozen=True)
class CallKind:
    """What a chunk needs from the model: only chunks of one kind share a call (one signature, one tensor shape)."""

    input: str  # "image" (encoded files), "pixels" (RGB [N, H, W, 3]) or "hu" (Hounsfield units [N, H, W])
    height: int = 0  # pixels and hu: one tensor, one size
    width: int = 0
    explain: bool = False  # the explain signature (with the heatmap) instead of the predict one


IMAGES = CallKind("image")


def pixels_kind(height: int, width: int) -> CallKind:
    return CallKind("pixels", height, width)


def hu_kind(height: int, width: int) -> CallKind:
    """CT slices in Hounsfield units (DICOM), merged with slices of the same size."""
    return CallKind("hu", height, width)


def explaining(kind: CallKind) -> CallKind:
    """The same input through the explain signature (the heatmap too)."""
    return replace(kind, explain=True)


@dataclass(eq=False)
class _Job:
    """One chunk of a request: ``size`` consecutive images starting at ``offset``."""

    work: _Work
    index: int
    offset: int
    payload: Any  # list[bytes], float32 ndarray [size, H, W, 3] (pixels) or [size, H, W] (HU)
    size: int
    pixels: int
    enqueued: float = 0.0


@dataclass(eq=False)
class _Work:
    """One request in the engine."""

    kind: CallKind
    request_id: str
    deadline: float
    future: asyncio.Future
    chunks: list[_Job] = field(default_factory=list)
    results: list[np.ndarray | None] = field(default_factory=list)
    next_chunk: int = 0
    taken_images: int = 0
    images: int = 0

    @property
    def finished(self) -> bool:
        return self.future.done()

    @property
    def remaining(self) -> int:
        return self.images - self.taken_images


class BatchingEngine:
    """``await engine.run(kind, payload, pixels, request_id=..., deadline=...)`` -> one output record per image."""

    def __init__(
        self,
        runner: SavedModelRunner,
        *,
        model_name: str,
        max_batch_size: int,
        max_call_pixels: int,
        max_wait_s: float = 0.0,
        call_timeout_s: float = 60.0,
        seconds_per_image: float = 0.1,
        explain_seconds_per_image: float | None = None,
    ):
        self._runner = runner
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_call_pixels = max_call_pixels
        self.max_wait_s = max_wait_s
        self.call_timeout_s = call_timeout_s
        #: Model seconds per image, a moving average of the calls so far (admission's time estimates)...
        self.seconds_per_image = seconds_per_image
        #: ... and the same for explain calls (a backward pass more), kept apart so neither skews the other.
        self.explain_seconds_per_image = explain_seconds_per_image or seconds_per_image
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: deque[_Job] = deque()
        self._active: set[_Work] = set()
        self._wakeup = asyncio.Event()  # bound to the running loop on first use (Python >= 3.10)
        self._worker: asyncio.Task | None = None
        self._call_started: float | None = None
        self._labels = {"model_name": model_name}

    # --- for admission and readiness -----------------------------------------------------------

    @property
    def queue_images(self) -> int:
        return sum(job.size for job in self._queue if not job.work.finished)

    def pace(self, explain: bool = False) -> float:
        """Model seconds per image of a predict (or explain) call, at the pace kept lately."""
        return self.explain_seconds_per_image if explain else self.seconds_per_image

    def remaining_seconds(self) -> list[float]:
        """Model seconds of the images not yet in a model call, per admitted request."""
        return [w.remaining * self.pace(w.kind.explain) for w in self._active if not w.finished]

    def queued_seconds(self) -> float:
        """Model seconds of the chunks waiting in the queue."""
        return sum(job.size * self.pace(job.work.kind.explain) for job in self._queue if not job.work.finished)

    def stalled_for(self) -> float:
        """Seconds the running model call is past ``call_timeout_s`` (0 when none is)."""
        started = self._call_started
        return 0.0 if started is None else max(0.0, time.monotonic() - started - self.call_timeout_s)

    # --- requests ------------------------------------------------------------------------------

    async def run(
        self,
        kind: CallKind,
        payload: Any,
        pixels: Sequence[int],
        *,
        request_id: str,
        deadline: float,
        first_chunk: int | None = None,
    ) -> np.ndarray:
        """Output records for ``payload`` (images or pixel rows, ``pixels`` decoded pixels each), in order.

        Raises TimeoutError when ``deadline`` (time.monotonic()) passes first; its work is dropped.
        ``first_chunk`` caps the images of the first chunk (what admission had room for).
        """
        loop = asyncio.get_running_loop()
        work = _Work(kind, request_id, deadline, loop.create_future(), images=len(pixels))
        work.chunks = self._split(work, payload, pixels, first_chunk)
        work.results = [None] * len(work.chunks)
        self._ensure_worker(loop)
        self._active.add(work)
        self._enqueue_next(work)
        try:
            return await asyncio.wait_for(work.future, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            metrics.DROPPED.labels(reason="deadline_exceeded", **self._labels).inc()
            raise
        except asyncio.CancelledError:  # the client went away (REST disconnect, gRPC cancel) or shutdown
            metrics.DROPPED.labels(reason="cancelled", **self._labels).inc()
            raise
        finally:
            self._forget(work)

    def chunk_bounds(self, pixels: Sequence[int], first: int | None = None) -> list[tuple[int, int, int]]:
        """(first image, end, decoded pixels) of each chunk of a request whose images have ``pixels`` pixels.

        ``first`` caps the first chunk's images (admission may have room for fewer than a full chunk).
        """
        bounds: list[tuple[int, int, int]] = []
        lo, n = 0, len(pixels)
        while lo < n:
            size = self.max_batch_size if bounds or first is None else max(1, first)
            hi, total = lo + 1, pixels[lo]
            while hi < n and hi - lo < size and total + pixels[hi] <= self.max_call_pixels:
                total += pixels[hi]
                hi += 1
            bounds.append((lo, hi, total))
            lo = hi
        return bounds

    def _split(self, work: _Work, payload: Any, pixels: Sequence[int], first: int | None) -> list[_Job]:
        return [
            _Job(work, i, lo, payload[lo:hi], hi - lo, total)
            for i, (lo, hi, total) in enumerate(self.chunk_bounds(pixels, first))
        ]

    def _enqueue_next(self, work: _Work) -> None:
        if work.next_chunk < len(work.chunks) and not work.finished:
            job = work.chunks[work.next_chunk]
            job.enqueued = time.monotonic()
            self._queue.append(job)
            work.next_chunk += 1
            self._wakeup.set()
        self._update_gauge()

    def _forget(self, work: _Work) -> None:
        """Drop a request's queued chunk and stop feeding its others (answered, failed, expired or cancelled)."""
        if not work.future.done():
            work.future.cancel()
        self._active.discard(work)
        self._queue = deque(job for job in self._queue if job.work is not work)
        self._update_gauge()

    def _update_gauge(self) -> None:
        metrics.QUEUE_IMAGES.labels(**self._labels).set(self.queue_images)

    # --- the loop ------------------------------------------------------------------------------

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done():
            # A fresh context: the loop must not keep the first request's context variables alive.
            self._worker = loop.create_task(self._loop(), name="chest-ct-batcher", context=contextvars.Context())

    async def _loop(self) -> None:
        while True:
            jobs: list[_Job] = []
            try:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await self._wait_for_company()
                jobs = self._take_call()
                if jobs:
                    await self._run_call(jobs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the server: fail this call's requests and go on
                self._fail_internal(jobs, exc, "the batching loop failed")

    async def _wait_for_company(self) -> None:
        """Hold the oldest chunk up to ``max_wait_s`` while its call is not full."""
        if self.max_wait_s <= 0:
            return
        first = self._queue[0]
        while not first.work.finished:
            queued = sum(j.size for j in self._queue if j.work.kind == first.work.kind and not j.work.finished)
            remaining = first.enqueued + self.max_wait_s - time.monotonic()
            if queued >= self.max_batch_size or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_call(self) -> list[_Job]:
        """The oldest live chunk plus later ones of its kind while they fit; their requests' next chunks queue up.

        Chunks whose request's deadline has passed are failed here rather than run.
        """
        now = time.monotonic()
        for job in self._queue:
            if not job.work.finished and job.work.deadline <= now:
                job.work.future.set_exception(TimeoutError())
        live = [job for job in self._queue if not job.work.finished]
        if not live:
            self._queue.clear()
            self._update_gauge()
            return []
        first = live[0]
        max_images, max_pixels = max(self.max_batch_size, first.size), max(self.max_call_pixels, first.pixels)
        taken: list[_Job] = []
        rest: deque[_Job] = deque()
        images = pixels = 0
        for job in live:
            if (
                job.work.kind == first.work.kind
                and images + job.size <= max_images
                and pixels + job.pixels <= max_pixels
            ):
                taken.append(job)
                images, pixels = images + job.size, pixels + job.pixels
            else:
                rest.append(job)
        self._queue = rest
        for job in taken:
            job.work.taken_images += job.size
            self._enqueue_next(job.work)
        self._update_gauge()
        return taken

    async def _run_call(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        kind, images = jobs[0].work.kind, sum(job.size for job in jobs)
        metrics.CALL_IMAGES.labels(**self._labels).observe(images)
        metrics.CALL_REQUESTS.labels(**self._labels).observe(len({id(job.work) for job in jobs}))
        started = self._call_started = time.monotonic()
        watchdog = loop.call_later(self.call_timeout_s, self._report_stall, jobs)
        try:
            results = await loop.run_in_executor(self._executor, self._call_guarded, kind, jobs)
        finally:
            watchdog.cancel()
            self._call_started = None
            elapsed = time.monotonic() - started
            if elapsed > self.call_timeout_s:
                logger.warning("The stalled model call ended after %.1f s; ready again", elapsed)
        metrics.MODEL_CALL_SECONDS.labels(**self._labels).observe(elapsed)
        if not any(isinstance(r, BaseException) for r in results):
            if kind.explain:
                self.explain_seconds_per_image = 0.8 * self.explain_seconds_per_image + 0.2 * elapsed / images
            else:
                self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / images
        for job, result in zip(jobs, results, strict=True):
            self._deliver(job, result)

    def _report_stall(self, jobs: list[_Job]) -> None:
        logger.error(
            "A model call of %d image(s) (requests %s) has run for more than %.3g s: the model answers "
            "not ready until it ends",
            sum(j.size for j in jobs),
            ", ".join(sorted({j.work.request_id for j in jobs})),
            self.call_timeout_s,
        )

    def _deliver(self, job: _Job, result: np.ndarray | BaseException) -> None:
        work = job.work
        if work.finished:  # expired or cancelled meanwhile
            return
        if isinstance(result, ModelInputError):
            work.future.set_exception(result)
        elif isinstance(result, BaseException):
            self._fail_internal([job], result, "the model call failed")
        else:
            work.results[job.index] = result
            parts = [r for r in work.results if r is not None]
            if len(parts) == len(work.results):
                answer: np.ndarray = np.concatenate(parts)
                if len(answer) != work.images:
                    self._fail_internal(
                        [job],
                        RuntimeError(f"reassembled {len(answer)} results for {work.images} images"),
                        "reassembly failed",
                    )
                else:
                    work.future.set_result(answer)

    def _fail_internal(self, jobs: list[_Job], exc: BaseException, what: str) -> None:
        works = {id(job.work): job.work for job in jobs if not job.work.finished}.values()
        logger.error(
            "%s for request(s) %s: %s: %s",
            what,
            ", ".join(w.request_id for w in works) or "-",
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        for work in works:
            work.future.set_exception(InternalError(work.request_id))

    # --- in the model thread -------------------------------------------------------------------

    def _call_guarded(self, kind: CallKind, jobs: list[_Job]) -> list[np.ndarray | BaseException]:
        """One call for all chunks; on an input error each chunk alone; each result checked against its size."""
        try:
            probs = self._call(kind, [job.payload for job in jobs])
        except ModelInputError as exc:
            if len(jobs) > 1:
                return [self._call_guarded(kind, [job])[0] for job in jobs]
            return [self._locate(kind, jobs[0], exc)]
        except Exception as exc:  # out of memory, internal TF errors...: not the input's fault, no re-run
            return [exc] * len(jobs)
        expected = sum(job.size for job in jobs)
        if probs.shape != (expected,):
            return [RuntimeError(f"the model returned {probs.shape[0]} results for {expected} images")] * len(jobs)
        bounds = np.cumsum([0] + [job.size for job in jobs])
        return [probs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def _locate(self, kind: CallKind, job: _Job, exc: ModelInputError) -> ModelInputError:
        """The input error of one chunk, naming the request's element when it is an encoded image."""
        if kind.input == IMAGES.input:
            found = self._runner.first_undecodable(job.payload)
            if found is not None:
                index, message = found
                return ModelInputError(
                    f"element {job.offset + index} cannot be decoded as an image: {message}", index=job.offset + index
                )
        return exc

    def _call(self, kind: CallKind, payloads: list[Any]) -> np.ndarray:
        if kind.input == IMAGES.input:
            return self._runner.predict_images([b for p in payloads for b in p], explain=kind.explain)
        batch = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
        if kind.input == "hu":
            return self._runner.predict_hu(batch, explain=kind.explain)
        return self._runner.predict_pixels(batch, explain=kind.explain)
