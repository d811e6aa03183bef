"""The out-of-distribution guard: is this image like the CT slices the model was trained on?

A classifier trained on two kinds of CT pictures answers just as confidently for a
photo, a blank image or a slice windowed for bone. The guard measures how far an
image's features lie from those of the fitting images, and flags the ones farther
than almost every fitting image was, so the answer can say "unsupported input"
instead of a confident probability.

- **Features**: the frozen VGG16 base's feature maps after each of its five blocks,
  averaged over the image (:func:`feature_model`; the last one is exactly what the
  classifier head reads). Early blocks see intensity and texture (an inverted or
  bone-windowed slice, noise, flat colour), late ones content (a photo). Each is
  square-rooted (pooled ReLU activations are skewed; the root makes them closer
  to Gaussian).
- **Density**: per block, a Gaussian with a Ledoit-Wolf shrunk covariance
  (scikit-learn): hundreds of images in up to 512 dimensions need the shrinkage.
  An image's distance in a block is its Mahalanobis distance.
- **Calibration**: out-of-fold. The fitting images (train and valid) are split
  into folds by duplicate group; each fold is scored by densities fitted on the
  others, so every fitting image gets a distance it did not help shape (~6x the
  calibration points of the validation images alone, which on small datasets are
  a few dozen). A block's distances are divided by their ``quantile`` (0.99) of
  these out-of-fold distances; ``ood_score`` is the largest of the five ratios,
  and the threshold is the ``quantile`` of the out-of-fold scores. So about
  ``quantile`` of new in-distribution images are accepted.
- **In the SavedModel**: :class:`GuardGraph` holds the densities as variables; every
  signature returns ``ood_score`` (float32) and ``in_distribution`` (bool,
  ``ood_score <= threshold``), whatever its head (:mod:`chest_ct.export`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import GroupKFold

from chest_ct import defaults
from chest_ct.model import split_model
from chest_ct.window import LUNG_WINDOW, Window

#: VGG16's block outputs the guard reads (the last one through the base's own average pooling).
BLOCKS = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool")
METHOD = "max over VGG16 blocks of Mahalanobis distance (Ledoit-Wolf) of sqrt pooled features, each / its quantile"


def feature_model(model: keras.Model) -> keras.Model:
    """The base's pooled feature maps of :data:`BLOCKS`, one pass; the last output is the base's own output."""
    base, _ = split_model(model)
    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"pooled_{name}")(base.get_layer(name).output) for name in BLOCKS[:-1]
    ]
    return keras.Model(base.input, [*pooled, base.output], name="pooled_features")


def block_features(
    model: keras.Model, files: Sequence[str], image_size: int, batch_size: int, window: Window = LUNG_WINDOW
) -> list[np.ndarray]:
    """Pooled features of every file (as training reads them), per block: ``[N, channels]`` each."""
    from chest_ct.inputs import image_dataset

    dataset = image_dataset(files, image_size, batch_size, window=window)
    return [np.asarray(f, np.float64) for f in feature_model(model).predict(dataset, verbose=0)]


def _transform(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(x, 0.0))


def _distances(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    z = _transform(features) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, precision, z), 0.0))


@dataclass
class Guard:
    """A fitted guard: per-block densities, their scales, and the threshold on ``ood_score``."""

    means: list[np.ndarray]
    precisions: list[np.ndarray]
    scales: list[float]
    threshold: float
    quantile: float
    calibration: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[str, ...] = BLOCKS

    def block_distances(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """``[N, blocks]`` distances, each divided by its block's scale."""
        return np.stack(
            [
                _distances(f, m, p) / s
                for f, m, p, s in zip(features, self.means, self.precisions, self.scales, strict=True)
            ],
            axis=1,
        )

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """``ood_score`` of each image (numpy; the SavedModel computes the same in float32)."""
        return self.block_distances(features).max(axis=1)

    def metadata(self) -> dict[str, Any]:
        """What ``model_metadata.json`` says about the guard."""
        return {
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "method": METHOD,
            "blocks": list(self.blocks),
            "outputs": {"ood_score": "FP32 [N]", "in_distribution": "BOOL [N]"},
            "calibration": self.calibration,
        }


def fit_guard(
    features: Sequence[np.ndarray],
    groups: Sequence[int],
    *,
    quantile: float = defaults.OOD_QUANTILE,
    folds: int = defaults.OOD_FOLDS,
) -> Guard:
    """Fit the densities on ``features`` (per block, ``[N, D]``) and calibrate the threshold out-of-fold.

    ``groups``: the duplicate group of each image, so copies of one picture never sit
    on both sides of a fold.
    """
    check_quantile(quantile)
    group_ids = np.asarray(groups)
    n_groups = len(set(group_ids.tolist()))
    if n_groups < 2:
        raise ValueError(
            f"the out-of-distribution guard needs at least 2 distinct pictures to calibrate, got {n_groups}"
        )
    n_blocks = len(features)
    oof = np.zeros((len(group_ids), n_blocks))
    splitter = GroupKFold(n_splits=min(folds, n_groups))
    for fit_idx, held_idx in splitter.split(features[0], groups=group_ids):
        for b, f in enumerate(features):
            density = LedoitWolf().fit(_transform(f[fit_idx]))
            oof[held_idx, b] = _distances(f[held_idx], density.location_, density.precision_)
    scales = [float(max(np.quantile(oof[:, b], quantile), 1e-6)) for b in range(n_blocks)]
    oof_scores = (oof / np.asarray(scales)).max(axis=1)
    threshold = float(np.quantile(oof_scores, quantile))
    densities = [LedoitWolf().fit(_transform(f)) for f in features]
    guard = Guard(
        means=[d.location_.astype(np.float32) for d in densities],
        precisions=[d.precision_.astype(np.float32) for d in densities],
        scales=scales,
        threshold=threshold,
        quantile=quantile,
    )
    fitted = guard.score(features)
    guard.calibration = {
        "images": len(groups),
        "pictures": n_groups,
        "folds": splitter.get_n_splits(),
        "out_of_fold_accepted": float(np.mean(oof_scores <= threshold)),
        "out_of_fold_score_percentiles": _percentiles(oof_scores),
        "fitted_score_percentiles": _percentiles(fitted),
        "shrinkage": [float(d.shrinkage_) for d in densities],
    }
    return guard


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 90, 99, 100)}


def check_quantile(quantile: float) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.5 <= quantile <= 1.0:
        raise ValueError(
            f"ood_quantile={quantile!r}: expected a number from 0.5 to 1 (the share of in-distribution "
            "images the guard accepts, e.g. 0.99)"
        )


class GuardGraph(tf.Module):
    """The guard inside the SavedModel: densities as variables, ``__call__`` on the pooled features."""

    def __init__(self, guard: Guard):
        super().__init__(name="ood_guard")
        self.means = [tf.Variable(m, trainable=False, dtype=tf.float32) for m in guard.means]
        self.precisions = [tf.Variable(p, trainable=False, dtype=tf.float32) for p in guard.precisions]
        self.scales = tf.Variable(np.asarray(guard.scales, np.float32), trainable=False)
        self.threshold = tf.Variable(np.float32(guard.threshold), trainable=False)

    def __call__(self, pooled: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """``{"ood_score": float32 [N], "in_distribution": bool [N]}`` for the pooled features of :data:`BLOCKS`."""
        ratios = []
        for b, (x, mean, precision) in enumerate(zip(pooled, self.means, self.precisions, strict=True)):
            z = tf.sqrt(tf.maximum(tf.cast(x, tf.float32), 0.0)) - mean
            squared = tf.reduce_sum(tf.matmul(z, precision) * z, axis=-1)
            ratios.append(tf.sqrt(tf.maximum(squared, 0.0)) / self.scales[b])
        score = tf.reduce_max(tf.stack(ratios, axis=1), axis=1)
        return {"ood_score": score, "in_distribution": score <= self.threshold}
