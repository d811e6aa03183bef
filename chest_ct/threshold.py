"""Choose the decision threshold from out-of-fold predictions over all fitting data.

A threshold picked on a small validation slice (a few distinct normal pictures)
swings wildly. Instead, grouped stratified k-fold over every fitting image (train
and valid roles, each duplicate group whole in one fold) gives each picture a
prediction from a model that never saw it; the threshold is the highest one whose
per-group sensitivity on those predictions reaches the target. The given
evaluation split is never used here: it is for scoring only.

Reported with it: the threshold each fold alone would choose (stability), each
fold's sensitivity and specificity at the chosen threshold, and the calibration
of the out-of-fold probabilities. The out-of-fold sensitivity meets the target by
construction, so it is named for what it is (``oof_sensitivity_where_chosen``),
never reported as a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm
from sklearn.model_selection import StratifiedGroupKFold

from chest_ct import defaults
from chest_ct.metrics import by_group, calibration

#: ``fit_predict(fit_indices, predict_indices) -> probabilities`` over the fitting images (train, then valid).
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def choose_threshold(y_true: npt.ArrayLike, prob: npt.ArrayLike, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity reaches ``target_sensitivity``.

    Missing a cancer costs more than a second look at a normal scan, so the
    sensitivity target comes first and specificity is maximised under it.
    """
    check_target(target_sensitivity)
    fpr, tpr, thresholds = skm.roc_curve(y_true, prob, drop_intermediate=False)
    reaching = thresholds[(tpr >= target_sensitivity) & np.isfinite(thresholds)]
    return float(np.max(reaching)) if reaching.size else float(np.min(prob))


def check_target(target_sensitivity: float) -> None:
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity={target_sensitivity}: expected a number in (0, 1]")


@dataclass
class ThresholdChoice:
    threshold: float
    target_sensitivity: float
    folds: int
    images: int
    groups_per_class: dict[str, int]
    fold_thresholds: list[float]
    fold_metrics: list[dict[str, float]]
    oof_sensitivity_where_chosen: float
    oof_specificity_where_chosen: float
    calibration: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def spread(self) -> float:
        """Largest minus smallest per-fold threshold (folds without both classes left out)."""
        return float(np.nanmax(self.fold_thresholds) - np.nanmin(self.fold_thresholds))

    def source(self) -> str:
        """One line for the model metadata (``threshold_source``), shown by the server."""
        return (
            f"out-of-fold: {self.folds}-fold grouped CV over {self.images} fitting images "
            f"({sum(self.groups_per_class.values())} pictures), "
            f"per-group sensitivity >= {self.target_sensitivity}; "
            f"fold thresholds {np.nanmin(self.fold_thresholds):.3f}-{np.nanmax(self.fold_thresholds):.3f}"
            + (f"; {self.note}" if self.note else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread, "source": self.source()}


def out_of_fold_threshold(
    labels: npt.ArrayLike,
    groups: npt.ArrayLike,
    fit_predict: FitPredict,
    *,
    target_sensitivity: float = defaults.TARGET_SENSITIVITY,
    folds: int = defaults.THRESHOLD_FOLDS,
    seed: int = defaults.SEED,
    class_names: Sequence[str] = ("negative", "positive"),
) -> ThresholdChoice:
    """Grouped stratified k-fold over the fitting images; ``fit_predict(fit_idx, held_idx)`` trains and predicts."""
    check_target(target_sensitivity)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"threshold_folds={folds!r}: expected an integer >= 2")
    y, g = np.asarray(labels, dtype=int), np.asarray(groups)
    pictures = {class_names[c]: len(set(g[y == c].tolist())) for c in (0, 1)}
    k = min(folds, *pictures.values())
    if k < 2:
        raise ValueError(
            f"cannot choose a threshold out-of-fold: distinct pictures per class in the fitting data "
            f"are {pictures}; each class needs at least 2"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = np.full(len(y), np.nan)
    held_out = []
    for fit_idx, held_idx in splitter.split(np.zeros(len(y)), y, g):
        oof[held_idx] = fit_predict(fit_idx, held_idx)
        held_out.append(held_idx)
    yg, pg, _ = by_group(y, oof, g)
    threshold = choose_threshold(yg, pg, target_sensitivity)
    fold_thresholds, fold_metrics = [], []
    for held_idx in held_out:
        fy, fp, _ = by_group(y[held_idx], oof[held_idx], g[held_idx])
        fold_thresholds.append(
            choose_threshold(fy, fp, target_sensitivity) if len(set(fy.tolist())) == 2 else float("nan")
        )
        fold_metrics.append({"groups": len(fy), **_sens_spec(fy, fp, threshold)})
    pooled = _sens_spec(yg, pg, threshold)
    return ThresholdChoice(
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        folds=k,
        images=len(y),
        groups_per_class=pictures,
        fold_thresholds=[float(t) for t in fold_thresholds],
        fold_metrics=fold_metrics,
        oof_sensitivity_where_chosen=pooled["sensitivity"],
        oof_specificity_where_chosen=pooled["specificity"],
        calibration={"per_image": calibration(y, oof), "per_group": calibration(yg, pg)},
        note=""
        if k == folds
        else f"{folds} folds asked, {k} possible with {min(pictures.values())} pictures in a class",
    )


def _sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    return {
        "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
        "specificity": float((~pred[neg]).mean()) if neg.any() else float("nan"),
    }
