"""Evaluation plots as PNG files: confusion matrices (per picture, per image) and ROC curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm

Unit = tuple[npt.ArrayLike, npt.ArrayLike]  # (labels, probabilities)


def save_plots(units: dict[str, Unit], threshold: float, class_names: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """One confusion matrix per unit (``per_group``, ``per_image``) and one ROC plot with a curve per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for unit, (y, p) in units.items():
        paths[f"confusion_matrix_{unit}"] = path = out_dir / f"confusion_matrix_{unit}.png"
        fig, ax = plt.subplots(figsize=(4.5, 4))
        pred = (np.asarray(p) >= threshold).astype(int)
        skm.ConfusionMatrixDisplay.from_predictions(y, pred, labels=[0, 1], display_labels=list(class_names),
                                                    ax=ax, colorbar=False)
        ax.set_title(f"{unit.replace('_', ' ')} (threshold {threshold:.3f})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    paths["roc_curve"] = out_dir / "roc_curve.png"
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for unit, (y, p) in units.items():
        skm.RocCurveDisplay.from_predictions(y, p, ax=ax, name=unit.replace("_", " "))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_title(f"ROC curve (positive: {class_names[1]})")
    fig.tight_layout()
    fig.savefig(paths["roc_curve"], dpi=100)
    plt.close(fig)
    return paths
