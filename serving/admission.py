"""Admission control: how much work the server takes on before it answers "overloaded" at once.

Each budget counts work accepted and not yet answered:

- **bytes** (``max_inflight_bytes``): request bodies held. REST counts a body
  from its Content-Length *before reading it* (or as a chunked body streams in),
  gRPC the message size;
- **images** (``max_queued_images``): images waiting for a model call, i.e. the
  engine's queue plus the places kept for requests being parsed and checked (a
  place is kept once the body is in, so requests keep their arrival order).
  Each admitted request has at most one chunk waiting, so this bounds how long
  a newcomer waits, whatever the size of the requests ahead. A request is
  admitted while there is room for one image; a large one enters with a first
  chunk as big as the room, so it competes like a small one;
- **pixels** (``max_queued_pixels``): decoded pixels of the images of admitted
  requests (pixel tensors are held as float32; encoded images are decoded to
  check them and again by the model), the memory side of large images;
- **time**: a request that, at the pace the model keeps now, would not be
  answered before its deadline while the requests already admitted take turns
  with it is refused rather than dropped halfway (its work would be wasted).
  Requests for the heatmap run the explain signature, whose pace the engine
  measures apart (a backward pass more), so each request is costed at its own.

A request bigger than a budget on its own is admitted when that budget is
otherwise unused, so every request within the per-request limits is served by
an idle server. A refusal raises ``Overloaded`` (503 + Retry-After /
UNAVAILABLE) and counts in ``chest_ct_requests_rejected{reason}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving import metrics
from serving.batching import BatchingEngine
from serving.config import ServerConfig
from serving.errors import Overloaded


@dataclass(eq=False)
class Ticket:
    """What one request holds in the budgets; ``Admission.release`` gives it all back once."""

    bytes: int = 0
    pixels: int = 0
    images: int = 0
    reserved_images: int = 0
    explain: bool = False
    released: bool = False


class Admission:
    def __init__(self, config: ServerConfig, engine: BatchingEngine, model_name: str):
        self.config = config
        self.engine = engine
        self._labels = {"model_name": model_name}
        metrics.create_series(model_name)
        self.inflight_bytes = 0
        self.held_pixels = 0
        self.reserved_images = 0
        #: (images, explain) of admitted requests whose first chunk is not yet in the engine's queue.
        self._reserved_requests: list[tuple[int, bool]] = []

    @property
    def queue_images(self) -> int:
        """Images waiting for a model call, including those reserved by requests still being checked."""
        return self.engine.queue_images + self.reserved_images

    def retry_after_s(self) -> int:
        """Seconds until the waiting images should have gone into model calls, at the model's current pace."""
        waiting = self.engine.queued_seconds() + self.reserved_images * self.engine.pace()
        return max(1, min(60, math.ceil(waiting)))

    def _refuse(self, what: str, reason: str) -> Overloaded:
        metrics.REJECTED.labels(reason=reason, **self._labels).inc()
        return Overloaded(what, reason, self.retry_after_s())

    # --- arrival (before the body is read) ----------------------------------------------------

    def enter(self, body_bytes: int) -> Ticket:
        """A ticket for a request that just arrived; Overloaded at once if it cannot be admitted anyway."""
        self._check_room(self.queue_images)
        ticket = Ticket()
        self.add_bytes(ticket, body_bytes)
        return ticket

    def hold(self, ticket: Ticket) -> None:
        """Keep a place in the queue for a request whose body is in but not yet parsed (Overloaded if none).

        Requests then take their places in the order their bodies arrived, not in the order their parsing
        ends: a large request's longer parse does not hand its place to the small ones behind it.
        """
        if ticket.reserved_images == 0:
            self._check_room(self.queue_images)
            ticket.reserved_images = 1
            self.reserved_images += 1

    def _check_room(self, queued: int) -> None:
        if queued >= self.config.max_queued_images:
            raise self._refuse(
                f"{queued} image(s) are waiting for the model, the limit is "
                f"{self.config.max_queued_images} (--max_queued_images)",
                "queue_images",
            )

    def add_bytes(self, ticket: Ticket, more: int) -> None:
        """Count ``more`` body bytes for ``ticket`` (a chunked body as it streams in)."""
        if more <= 0:
            return
        limit = self.config.max_inflight_bytes
        if self.inflight_bytes - ticket.bytes > 0 and self.inflight_bytes + more > limit:
            raise self._refuse(
                f"requests being read or served hold {self.inflight_bytes} bytes, this one adds "
                f"{ticket.bytes + more}, the limit is {limit} (--max_inflight_bytes)",
                "inflight_bytes",
            )
        ticket.bytes += more
        self.inflight_bytes += more
        metrics.INFLIGHT_BYTES.labels(**self._labels).set(self.inflight_bytes)

    # --- after parsing (images and pixels known) -----------------------------------------------

    def admit(
        self, ticket: Ticket, images: int, first_chunk: int, pixels: int, time_left_s: float, explain: bool = False
    ) -> int:
        """Admit a parsed request of ``images`` images (``pixels`` decoded pixels) or raise Overloaded.

        ``explain``: the request asked for the heatmap (the explain signature's pace applies).
        Returns how many images its first chunk may have: ``first_chunk``, or fewer when the queue has
        room for fewer (a large request competes for a place like a small one, then takes turns).
        """
        cfg = self.config
        self.hold(ticket)
        queued = self.queue_images - ticket.reserved_images  # ahead of this request
        if queued > 0:
            self._check_room(queued)
            first_chunk = min(first_chunk, cfg.max_queued_images - queued)
        if self.held_pixels > 0 and self.held_pixels + pixels > cfg.max_queued_pixels:
            raise self._refuse(
                f"admitted requests hold {self.held_pixels} decoded pixels and this one has {pixels}, "
                f"the limit is {cfg.max_queued_pixels} (--max_queued_pixels)",
                "queue_pixels",
            )
        others = [
            *self.engine.remaining_seconds(),
            *(n * self.engine.pace(heatmap) for n, heatmap in self._reserved_requests),
        ]
        if others:
            pace = self.engine.pace(explain)
            own = pace * images  # each request ahead gets a turn per chunk: at most as much model time as this one
            estimate = own + sum(min(seconds, own) for seconds in others)
            if estimate > time_left_s:
                raise self._refuse(
                    f"at the current pace ({pace * 1000:.0f} ms per image{' with heatmap' * explain}, "
                    f"{len(others)} request(s) taking turns) these {images} image(s) would take about "
                    f"{estimate:.1f} s, more than the {time_left_s:.1f} s left before the request's "
                    "deadline",
                    "deadline",
                )
        ticket.pixels = pixels
        self.held_pixels += pixels
        self.reserved_images += first_chunk - ticket.reserved_images
        ticket.images, ticket.reserved_images, ticket.explain = images, first_chunk, explain
        self._reserved_requests.append((images, explain))
        metrics.HELD_PIXELS.labels(**self._labels).set(self.held_pixels)
        return first_chunk

    def queued(self, ticket: Ticket) -> None:
        """The request's first chunk is now in the engine's queue (or it failed): its reservation ends."""
        if ticket.reserved_images:
            self.reserved_images -= ticket.reserved_images
            ticket.reserved_images = 0
        if ticket.images and (ticket.images, ticket.explain) in self._reserved_requests:
            self._reserved_requests.remove((ticket.images, ticket.explain))
            ticket.images = 0

    def release(self, ticket: Ticket) -> None:
        """Give back everything ``ticket`` holds (idempotent)."""
        if ticket.released:
            return
        ticket.released = True
        self.queued(ticket)
        self.inflight_bytes -= ticket.bytes
        self.held_pixels -= ticket.pixels
        metrics.INFLIGHT_BYTES.labels(**self._labels).set(self.inflight_bytes)
        metrics.HELD_PIXELS.labels(**self._labels).set(self.held_pixels)
