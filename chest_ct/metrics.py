"""Classification metrics per image and per picture (duplicate group), calibration, bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve


def classification_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """Loss, accuracy, precision, sensitivity, specificity, F1, ROC AUC and the confusion counts."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "loss": float(skm.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "sensitivity": float(skm.recall_score(y, pred, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan"),
        "brier": float(skm.brier_score_loss(y, p, pos_label=1)) if len(y) else float("nan"),
        "threshold": float(threshold),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def by_group(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, groups: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per duplicate group: ``(label, mean probability, group id)``, groups in ascending order.

    Copies of one picture are one piece of evidence, so per-picture metrics count
    each group once. A group's members share one label (label conflicts never reach here).
    """
    y, p, g = np.asarray(y_true, dtype=int), np.asarray(prob, dtype=float), np.asarray(groups)
    ids, inverse = np.unique(g, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids))
    mean_p = np.bincount(inverse, weights=p, minlength=len(ids)) / counts
    positives = np.bincount(inverse, weights=y, minlength=len(ids))
    if np.any((positives != 0) & (positives != counts)):
        raise ValueError("a duplicate group holds both labels; label conflicts must be excluded first")
    return (positives > 0).astype(int), mean_p, ids


def calibration(y_true: npt.ArrayLike, prob: npt.ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Brier score, expected calibration error (equal-width bins) and the reliability curve."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(prob, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = sum(
        abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    )
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    return {
        "brier": float(skm.brier_score_loss(y, p, pos_label=1)),
        "ece": float(ece),
        "n": int(len(y)),
        "reliability": {
            "mean_predicted": [round(float(v), 4) for v in mean_pred],
            "fraction_positive": [round(float(v), 4) for v in frac_pos],
        },
    }


def roc_points(y_true: npt.ArrayLike, prob: npt.ArrayLike, max_points: int = 200) -> list[tuple[float, float, float]]:
    """(fpr, tpr, threshold) triples, thinned for the KFP ClassificationMetrics artifact."""
    fpr, tpr, thr = skm.roc_curve(y_true, prob)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    idx = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).astype(int))
    return [(float(fpr[i]), float(tpr[i]), float(thr[i])) for i in idx]


#: Metrics that get bootstrap intervals (cheap enough to recompute thousands of times).
INTERVAL_METRICS = ("sensitivity", "specificity", "roc_auc")
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class Estimate:
    """A metric's value on the data and its bootstrap percentile interval."""

    value: float
    low: float
    high: float


def rate_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity (NaN without the class) and ROC AUC (NaN without both classes)."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(prob, dtype=float)
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    return {
        "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
        "specificity": float((~pred[neg]).mean()) if neg.any() else float("nan"),
        "roc_auc": float(skm.roc_auc_score(y, p)) if pos.any() and neg.any() else float("nan"),
    }


def bootstrap_intervals(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    threshold: float,
    *,
    groups: npt.ArrayLike | None = None,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """:data:`INTERVAL_METRICS` with percentile intervals, resampling whole ``groups`` within each class.

    Copies of one picture are not independent evidence: with ``groups`` the
    resampling draws duplicate groups (a cluster bootstrap) and keeps all their
    images, so per-image intervals are not made narrower by the copies. Without
    ``groups`` every unit is its own group. Stratified by class, so every
    resample has both classes and an AUC.
    """
    y, p = np.asarray(y_true, dtype=int), np.asarray(prob, dtype=float)
    ids, inverse = np.unique(np.arange(len(y)) if groups is None else np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    group_label = np.array([y[m[0]] for m in members], dtype=int)
    pos, neg = np.flatnonzero(group_label == 1), np.flatnonzero(group_label == 0)
    if not pos.size or not neg.size:
        raise ValueError(
            f"bootstrap intervals need both classes; got {pos.size} positive and {neg.size} negative units"
        )
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in INTERVAL_METRICS}
    for _ in range(rounds):
        chosen = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        idx = np.concatenate([members[k] for k in chosen])
        for name, value in rate_metrics(y[idx], p[idx], threshold).items():
            draws[name].append(value)
    point, tail = rate_metrics(y, p, threshold), (1 - level) / 2 * 100
    return {
        name: Estimate(point[name], *(float(v) for v in np.nanpercentile(draws[name], [tail, 100 - tail])))
        for name in INTERVAL_METRICS
    }
