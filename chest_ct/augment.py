"""Training-time augmentation with stateless random ops: the same seed gives the same images.

Each image's random draws depend only on ``(seed, its position in the stream)``,
never on a random state shared across tf.data's parallel map calls, so a run is
repeatable however the map is scheduled. Mild changes only: CT slices are roughly
centred and upright; brightness and contrast jitter also weaken brightness as a
shortcut cue.
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_ROTATION = 0.05 * 2 * math.pi  # radians, either way
MAX_ZOOM = 0.1
MAX_CONTRAST = 0.2
MAX_BRIGHTNESS = 0.15 * 255.0


def augment_image(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Randomly flip, rotate, zoom, and change contrast and brightness of one float32 ``[H, W, 3]`` image.

    ``seed`` is an int ``[2]`` tensor; pixels stay in 0..255.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    angle = tf.random.stateless_uniform([], seeds[1], -MAX_ROTATION, MAX_ROTATION)
    scale = tf.random.stateless_uniform([], seeds[2], 1.0 - MAX_ZOOM, 1.0 + MAX_ZOOM)
    image = _rotate_and_zoom(image, angle, scale)
    image = tf.image.stateless_random_contrast(image, 1.0 - MAX_CONTRAST, 1.0 + MAX_CONTRAST, seeds[3])
    image = tf.image.stateless_random_brightness(image, MAX_BRIGHTNESS, seeds[4])
    return tf.clip_by_value(image, 0.0, 255.0)


def _rotate_and_zoom(image: tf.Tensor, angle: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Rotate by ``angle`` and sample with ``scale`` about the centre (scale < 1 zooms in), reflecting at edges."""
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = scale * tf.cos(angle), scale * tf.sin(angle)
    # Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2).
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]
