"""Out-of-fold predictions of the classifier's head, on the cached features: what the threshold is chosen on.

:func:`chest_ct.threshold.out_of_fold_threshold` asks for predictions on images
a head never fitted; refitting only the head on cached VGG16 features makes each fold
cost seconds, not a VGG16 pass.
"""

from __future__ import annotations

import keras
import numpy as np

from chest_ct.fitting import Examples, TrainResult, picture_weights
from chest_ct.model import split_model
from chest_ct.threshold import FitPredict


def head_fit_predict(
    result: TrainResult, train: Examples, valid: Examples, *, batch_size: int, learning_rate: float
) -> FitPredict:
    """Fit a fresh head (same start, same epochs as the exported one) on some fitting images, predict others.

    The fitting images are ``train`` then ``valid``; augmented copies of training
    images go with them into the fitted part. Used for out-of-fold predictions.
    One head is built and compiled for all folds and reset to the start before each
    (weights and optimizer state): a fresh Keras model per fold costs a compile and a
    trace each, half of the folds' time.
    """
    _, template = split_model(result.model)
    head = keras.models.clone_model(template)
    head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=keras.losses.BinaryCrossentropy())
    head.optimizer.build(head.trainable_variables)
    feats = result.features
    x_all = np.concatenate([feats.train, feats.valid])
    y_all = np.asarray([*train.labels, *valid.labels], np.float32)
    g_all = np.asarray([*train.groups, *valid.groups])
    copies = len(feats.train_augmented)

    def fit_predict(fit_idx: np.ndarray, predict_idx: np.ndarray) -> np.ndarray:
        has_copies = fit_idx < len(train)
        # An image's weight is shared among its augmented copies, as in the exported model's fit.
        w = picture_weights(y_all[fit_idx], g_all[fit_idx]) * np.where(has_copies, 1.0 / (1 + copies), 1.0)
        origin = np.concatenate([fit_idx, *[fit_idx[has_copies]] * copies])
        x = np.concatenate([x_all[fit_idx], *[a[fit_idx[has_copies]] for a in feats.train_augmented]])
        w = np.concatenate([w, *[w[has_copies]] * copies])
        head.set_weights(result.initial_head_weights)
        for variable in head.optimizer.variables:  # iterations, moments: as a new optimizer has them
            variable.assign(np.zeros(variable.shape, variable.dtype))
        head.fit(
            x,
            y_all[origin],
            sample_weight=w / w.mean(),
            epochs=result.head_best_epoch,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
        )
        return np.asarray(head(x_all[predict_idx], training=False)).reshape(-1)  # a few rows: one call, no retracing

    return fit_predict
