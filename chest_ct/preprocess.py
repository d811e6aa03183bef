"""Image -> model input, as TensorFlow ops.

Training's tf.data pipeline and the exported SavedModel's serving signatures call
these same functions, so what the server does to an image is by construction what
training did.
"""

from __future__ import annotations

import tensorflow as tf
from keras.applications import vgg16


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


def to_model_input(pixels: tf.Tensor) -> tf.Tensor:
    """VGG16's ImageNet preprocessing (RGB -> BGR, subtract the channel means)."""
    return vgg16.preprocess_input(tf.identity(pixels))
