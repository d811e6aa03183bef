"""Evaluation plots as PNG files: confusion matrices, ROC and precision-recall curves, reliability.

Every plot draws each unit (``per_group``: each duplicate group once, what the
blessing uses; ``per_image``: every file) and marks the operating point at the
model's stored threshold, so a reader sees where on the curve the served model sits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm

Unit = tuple[npt.ArrayLike, npt.ArrayLike]  # (labels, probabilities)
#: Reliability bins: the test split is small, finer bins would mostly be empty.
CALIBRATION_BINS = 5


def _label(unit: str) -> str:
    return {"per_group": "per picture"}.get(unit, unit.replace("_", " "))


def save_plots(units: dict[str, Unit], threshold: float, class_names: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """Confusion matrix per unit; ROC, precision-recall and reliability plots with a curve per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def save(name: str, fig) -> None:
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=100, bbox_inches="tight")
        plt.close(fig)

    for unit, (y, p) in units.items():
        fig, ax = plt.subplots(figsize=(4.5, 4))
        pred = (np.asarray(p) >= threshold).astype(int)
        skm.ConfusionMatrixDisplay.from_predictions(
            y, pred, labels=[0, 1], display_labels=list(class_names), ax=ax, colorbar=False
        )
        ax.set_title(f"{_label(unit)} (threshold {threshold:.3f})")
        save(f"confusion_matrix_{unit}", fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for unit, (y, p) in units.items():
        line = skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name=_label(unit)).line_
        m = _operating_point(y, p, threshold)
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel=f"sensitivity ({class_names[1]})", title="ROC; dots: at the threshold")
    save("roc_curve", fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for unit, (y, p) in units.items():
        line = skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name=_label(unit)).line_
        m = _operating_point(y, p, threshold)
        ax.plot(m["sensitivity"], m["precision"], "o", color=line.get_color())
        ax.axhline(float(np.mean(np.asarray(y, dtype=float))), linestyle=":", color=line.get_color(), linewidth=1)
    ax.set(xlabel=f"sensitivity (recall of {class_names[1]})", ylabel="precision")
    ax.set_title("Precision-recall; dots: at the threshold,\ndotted: prevalence", fontsize=10)
    save("precision_recall_curve", fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for unit, (y, p) in units.items():
        top.plot(*_reliability(y, p), marker="o", label=_label(unit))
        bottom.hist(np.asarray(p, float), bins=np.linspace(0, 1, 11), alpha=0.5, label=_label(unit))
    top.set(ylabel=f"fraction {class_names[1]}", title=f"Reliability ({CALIBRATION_BINS} bins)", ylim=(-0.02, 1.02))
    top.legend(fontsize=8)
    bottom.axvline(threshold, color="black", linewidth=1)
    bottom.set(xlabel="predicted probability", ylabel="count", xlim=(0, 1))
    save("calibration", fig)
    return paths


def _operating_point(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> dict[str, float]:
    labels, pred = np.asarray(y, int), np.asarray(p, float) >= threshold
    tp = int((pred & (labels == 1)).sum())
    return {
        "sensitivity": tp / max(int((labels == 1).sum()), 1),
        "specificity": int((~pred & (labels == 0)).sum()) / max(int((labels == 0).sum()), 1),
        "precision": tp / int(pred.sum()) if pred.any() else float("nan"),
    }  # undefined: not drawn


def _reliability(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.calibration import calibration_curve

    fraction_positive, mean_predicted = calibration_curve(y, p, n_bins=CALIBRATION_BINS, strategy="uniform")
    return mean_predicted, fraction_positive
