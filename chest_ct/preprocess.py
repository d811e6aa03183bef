"""Image -> model input, as TensorFlow ops.

Training's tf.data pipeline and the exported SavedModel's serving signatures call
these same functions, so what the server does to an image is by construction what
training did. That includes the window that turns a CT slice in Hounsfield units
(DICOM, decoded by :mod:`serving.dicom`) into the grey levels the model reads.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras.applications import vgg16

from chest_ct.window import Window


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG (RGB, RGBA or grayscale) -> uint8 RGB ``[height, width, 3]``.

    Ingest validates every image with this same function, so a file passes ingest
    exactly when training and serving can decode it.
    """
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded PNG/JPEG (RGB, RGBA or grayscale) -> float32 RGB ``[size, size, 3]`` in 0..255."""
    return resize(decode(encoded), image_size)


def resize(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """RGB pixels in 0..255 (any size, batched or not) -> float32 at the model's input size."""
    pixels = tf.cast(pixels, tf.float32)
    return tf.image.resize(pixels, [image_size, image_size], method="bilinear", antialias=True)


def window_hu(hu: tf.Tensor, window: Window) -> tf.Tensor:
    """Hounsfield units (any shape) -> float32 grey levels in 0..255 through ``window``."""
    low = window.level - window.width / 2.0
    return tf.clip_by_value((tf.cast(hu, tf.float32) - low) * (255.0 / window.width), 0.0, 255.0)


def hu_to_pixels(hu: tf.Tensor, window: Window) -> tf.Tensor:
    """HU ``[..., H, W]`` -> windowed grey as RGB ``[..., H, W, 3]`` in 0..255 (grey in all three channels)."""
    grey = window_hu(hu, window)[..., tf.newaxis]
    return tf.concat([grey, grey, grey], axis=-1)


def to_model_input(pixels: tf.Tensor) -> tf.Tensor:
    """VGG16's ImageNet preprocessing (RGB -> BGR, subtract the channel means)."""
    return vgg16.preprocess_input(tf.identity(pixels))


def is_dicom(encoded: tf.Tensor) -> tf.Tensor:
    """True for a DICOM Part 10 file (``DICM`` at byte 128), as :func:`serving.dicom.is_dicom` decides."""
    return tf.strings.regex_full_match(tf.strings.substr(encoded, 0, 132), "(?s).{128}DICM")


def _read_hu(encoded: bytes | np.ndarray) -> np.ndarray:
    from chest_ct.images import DEFAULT_MAX_PIXELS
    from serving.dicom import read_hu

    return read_hu(np.asarray(encoded).item(), DEFAULT_MAX_PIXELS)  # a scalar string tensor arrives as 0-d array


def read_hu(encoded: tf.Tensor) -> tf.Tensor:
    """A DICOM file's HU ``[rows, columns]`` inside a tf.data pipeline (pydicom, the reader ingest and serving use)."""
    hu = tf.numpy_function(_read_hu, [encoded], tf.float32, stateful=False)
    hu.set_shape([None, None])
    return hu


def file_to_pixels(encoded: tf.Tensor, image_size: int, window: Window) -> tf.Tensor:
    """Any file ingest accepts (PNG, JPEG or a DICOM CT slice) -> float32 RGB ``[size, size, 3]`` in 0..255.

    Training reads its files with this. A DICOM file goes through the same
    :func:`hu_to_pixels` and :func:`resize` as the SavedModel's ``serve_hu`` signature.
    """
    return tf.cond(
        is_dicom(encoded),
        lambda: resize(hu_to_pixels(read_hu(encoded), window), image_size),
        lambda: decode_and_resize(encoded, image_size),
    )
