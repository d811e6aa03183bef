"""Drift metrics: what the model is being shown, per model, on ``/metrics``.

Every answered image is observed once: its ``ood_score`` (the out-of-distribution
guard's distance from the training images; the model's threshold is on the
metadata endpoint) and its predicted probability go into histograms, and an image
the guard rejected counts in ``chest_ct_guard_rejections_total``. A shift in what
clients send (a new scanner, another window, another body part) moves the score
histogram and the rejection rate long before anyone looks at accuracy: the alert
rule that watches them is in docs/cluster.md ("Drift").
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from serving.metrics import LABELS

#: ``ood_score`` is scaled so the training images' calibration quantile sits near 1; foreign pictures score 2-100.
OOD_SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
PROBABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99)

OOD_SCORE = Histogram(
    "chest_ct_ood_score",
    "Out-of-distribution score of each answered image (the guard rejects scores above the model's ood_threshold)",
    LABELS,
    buckets=OOD_SCORE_BUCKETS,
)
PROBABILITY = Histogram(
    "chest_ct_probability",
    "Predicted probability of the positive class of each answered image",
    LABELS,
    buckets=PROBABILITY_BUCKETS,
)
GUARD_REJECTIONS = Counter(
    "chest_ct_guard_rejections", "Answered images the out-of-distribution guard flagged as unsupported input", LABELS
)
#: The served model's threshold, so an alert can compare live scores with it whatever model is deployed.
OOD_THRESHOLD = Gauge("chest_ct_ood_threshold", "The served model's out-of-distribution threshold on ood_score", LABELS)


def create_series(model_name: str, ood_threshold: float) -> None:
    """Make the model's series exist at 0 (a drift alert sees zeros rather than gaps); publish its threshold."""
    for metric in (OOD_SCORE, PROBABILITY, GUARD_REJECTIONS):
        metric.labels(model_name=model_name)
    OOD_THRESHOLD.labels(model_name=model_name).set(ood_threshold)


def observe(model_name: str, probability: np.ndarray, ood_score: np.ndarray, in_distribution: np.ndarray) -> None:
    """Record one response's images."""
    scores, probs = OOD_SCORE.labels(model_name=model_name), PROBABILITY.labels(model_name=model_name)
    for score, prob in zip(ood_score.tolist(), probability.tolist(), strict=True):
        scores.observe(score)
        probs.observe(prob)
    rejected = int(np.count_nonzero(~np.asarray(in_distribution, bool)))
    if rejected:
        GUARD_REJECTIONS.labels(model_name=model_name).inc(rejected)
