"""Shortcut audit: how well do image statistics alone predict the label?

If a logistic regression on brightness, size and file format scores close to the
model, the model's score may come from how the images were collected rather than
from pathology. On the shared chest CT data the two classes come from different
sources, so this is a real risk, not a formality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from chest_ct.records import ImageRecord

FEATURES = ("brightness_mean", "brightness_std", "width", "height", "is_png")
DEFAULT_MARGIN = 0.05


def image_statistics(records: Sequence[ImageRecord]) -> np.ndarray:
    return np.array(
        [
            [
                r.image.brightness_mean,
                r.image.brightness_std,
                r.image.width,
                r.image.height,
                1.0 if r.image.format == "PNG" else 0.0,
            ]
            for r in records
        ],
        dtype=float,
    )


def shortcut_audit(
    train_records: Sequence[ImageRecord],
    eval_records: Sequence[ImageRecord],
    positive_class: str,
    model_auc: float,
    *,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Fit on ``train_records``' statistics, score on ``eval_records``; compare with ``model_auc``."""
    y_train = [int(r.label == positive_class) for r in train_records]
    y_eval = [int(r.label == positive_class) for r in eval_records]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    clf.fit(image_statistics(train_records), y_train)
    auc = float(roc_auc_score(y_eval, clf.predict_proba(image_statistics(eval_records))[:, 1]))
    # Which single statistic carries the most signal, to say what the shortcut is.
    single = {}
    for i, name in enumerate(FEATURES):
        column = image_statistics(eval_records)[:, i]
        if np.ptp(column) > 0:
            single[name] = round(float(max(roc_auc_score(y_eval, column), 1 - roc_auc_score(y_eval, column))), 4)
    warning = auc >= model_auc - margin
    message = (
        f"SHORTCUT WARNING: image statistics alone ({', '.join(FEATURES)}) reach AUC {auc:.3f}, within {margin} "
        f"of the model's {model_auc:.3f}; the score may not reflect pathology"
        if warning
        else f"image statistics alone reach AUC {auc:.3f}, below the model's {model_auc:.3f} by more than {margin}"
    )
    return {
        "statistics_auc": auc,
        "model_auc": float(model_auc),
        "margin": margin,
        "warning": bool(warning),
        "single_feature_auc": single,
        "features": list(FEATURES),
        "message": message,
    }
