"""tf.data input pipelines that stream images from their files, and the frozen base's features.

Nothing here holds a split's image bytes in memory: files are read, decoded and
resized batch by batch. Preprocessing is :mod:`chest_ct.preprocess`, the same
functions the exported SavedModel runs; DICOM slices are read in Hounsfield units
and shown to the model through ``window``, as the SavedModel's ``serve_hu`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from chest_ct.augment import augment_image
from chest_ct.preprocess import file_to_pixels, to_model_input
from chest_ct.window import LUNG_WINDOW, Window


def image_dataset(
    files: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    labels: npt.ArrayLike | None = None,
    weights: npt.ArrayLike | None = None,
    augment_seed: int | None = None,
    shuffle_seed: int | None = None,
    window: Window = LUNG_WINDOW,
) -> tf.data.Dataset:
    """Batches of model-ready images, or ``(images, labels[, weights])`` when labels are given.

    With ``augment_seed`` every image is augmented; the draws depend on the seed, the
    image's position and, when the dataset is iterated again (a new epoch), a new
    deterministic draw. Without ``shuffle_seed`` the order is the file order, so
    extracted features line up with their labels.
    """
    columns: tuple[object, ...] = (list(files),)
    if labels is not None:
        columns += (np.asarray(labels, np.float32),)
        if weights is not None:
            columns += (np.asarray(weights, np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    if augment_seed is not None:
        # One int64 per element from a seeded stream that changes on each pass over the data.
        draws = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws)
    else:
        ds = ds.map(lambda *cols: (cols, tf.constant(0, tf.int64)))

    def load(cols: tuple[tf.Tensor, ...], draw: tf.Tensor) -> tuple[tf.Tensor, ...] | tf.Tensor:
        image = file_to_pixels(tf.io.read_file(cols[0]), image_size, window)
        if augment_seed is not None:
            image = augment_image(image, tf.stack([draw, tf.constant(augment_seed, tf.int64)]))
        image = to_model_input(image)
        return image if len(cols) == 1 else (image, *cols[1:])

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def extract_features(
    base: keras.Model,
    files: Sequence[str],
    image_size: int,
    batch_size: int,
    augment_seed: int | None = None,
    window: Window = LUNG_WINDOW,
) -> np.ndarray:
    """The frozen base's output for every file, in file order (``[N, features]``)."""
    return np.asarray(
        base.predict(image_dataset(files, image_size, batch_size, augment_seed=augment_seed, window=window), verbose=0)
    )
