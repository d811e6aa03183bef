"""Prometheus metrics of the chest-ct server, served on ``/metrics`` next to kserve's own.

Every metric carries the ``model_name`` label, like kserve's request latency histograms.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("model_name",)

QUEUE_IMAGES = Gauge("chest_ct_queue_images", "Images waiting for a model call (queue depth)", LABELS)
HELD_PIXELS = Gauge("chest_ct_queued_pixels", "Decoded pixels of the images of admitted, unanswered requests", LABELS)
INFLIGHT_BYTES = Gauge("chest_ct_inflight_bytes", "Request-body bytes held by requests being read or served", LABELS)
MODEL_CALL_SECONDS = Histogram(
    "chest_ct_model_call_seconds",
    "Duration of one SavedModel call",
    LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CALL_IMAGES = Histogram(
    "chest_ct_model_call_images",
    "Images per SavedModel call after merging and splitting",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
CALL_REQUESTS = Histogram(
    "chest_ct_model_call_requests", "Requests served by one SavedModel call", LABELS, buckets=(1, 2, 4, 8, 16, 32)
)
#: Label values, created up front so every series is on /metrics (at 0) before the first event.
REJECT_REASONS = ("queue_images", "queue_pixels", "inflight_bytes", "deadline")
DROP_REASONS = ("deadline_exceeded", "cancelled")
REJECTED = Counter(
    "chest_ct_requests_rejected",
    "Requests refused by admission control (503 / UNAVAILABLE), by the budget that was full",
    (*LABELS, "reason"),
)
DROPPED = Counter(
    "chest_ct_requests_dropped",
    "Admitted requests whose remaining work was dropped (deadline_exceeded, client_disconnected)",
    (*LABELS, "reason"),
)


def create_series(model_name: str) -> None:
    """Make every labelled series of ``model_name`` exist, so dashboards and alerts see zeros, not gaps."""
    for gauge in (QUEUE_IMAGES, HELD_PIXELS, INFLIGHT_BYTES):
        gauge.labels(model_name=model_name)
    for histogram in (MODEL_CALL_SECONDS, CALL_IMAGES, CALL_REQUESTS):
        histogram.labels(model_name=model_name)
    for reason in REJECT_REASONS:
        REJECTED.labels(model_name=model_name, reason=reason)
    for reason in DROP_REASONS:
        DROPPED.labels(model_name=model_name, reason=reason)
