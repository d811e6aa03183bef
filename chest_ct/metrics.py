"""Classification metrics, the decision threshold, and their plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn import metrics as skm


def choose_threshold(y_true: Sequence[int], prob: Sequence[float], target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity reaches ``target_sensitivity``.

    Missing a cancer costs more than a second look at a normal scan, so the
    sensitivity target comes first and specificity is maximised under it.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity={target_sensitivity}: expected a number in (0, 1]")
    fpr, tpr, thresholds = skm.roc_curve(y_true, prob, drop_intermediate=False)
    reaching = thresholds[(tpr >= target_sensitivity) & np.isfinite(thresholds)]
    return float(np.max(reaching)) if reaching.size else float(np.min(prob))


def classification_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float) -> dict[str, float]:
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
        "threshold": float(threshold),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def roc_points(y_true: Sequence[int], prob: Sequence[float], max_points: int = 200) -> list[tuple[float, float, float]]:
    """(fpr, tpr, threshold) triples, thinned for the KFP ClassificationMetrics artifact."""
    fpr, tpr, thr = skm.roc_curve(y_true, prob)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    idx = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).astype(int))
    return [(float(fpr[i]), float(tpr[i]), float(thr[i])) for i in idx]


def save_plots(y_true: Sequence[int], prob: Sequence[float], threshold: float, class_names: Sequence[str],
               out_dir: Path) -> dict[str, Path]:
    """Confusion matrix and ROC curve as PNG files; returns their paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = (np.asarray(prob) >= threshold).astype(int)
    paths = {"confusion_matrix": out_dir / "confusion_matrix.png", "roc_curve": out_dir / "roc_curve.png"}

    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.ConfusionMatrixDisplay.from_predictions(y_true, pred, labels=[0, 1], display_labels=list(class_names),
                                                ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix (threshold {threshold:.3f})")
    fig.tight_layout()
    fig.savefig(paths["confusion_matrix"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.RocCurveDisplay.from_predictions(y_true, prob, ax=ax, name="chest-ct")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_title("ROC curve (positive: adenocarcinoma)")
    fig.tight_layout()
    fig.savefig(paths["roc_curve"], dpi=100)
    plt.close(fig)
    return paths
