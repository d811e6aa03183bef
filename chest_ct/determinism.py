"""One seed for every random step: weight initialisation, shuffling, dropout, augmentation, folds."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; with ``deterministic``, also TF op determinism.

    On CPU the seed alone makes runs repeatable. GPU kernels (cuDNN convolutions,
    atomics in reductions) can still differ run to run unless op determinism is on,
    which costs speed on some ops and cannot be turned off again in this process.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an integer >= 0")
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        log.info("TensorFlow op determinism enabled")
