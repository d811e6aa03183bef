"""Grad-CAM of the adenocarcinoma score, as TensorFlow ops inside the exported graph.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last convolutional
layer by the mean gradient of the class score over the grid, sums the weighted
channels and keeps the positive part: the cells whose activations push the
score up. Here the score is the head's **logit** (before the sigmoid), so a
confident prediction (probability 1.0 in float32) still has gradients.

Each map is divided by its own maximum, so values are 0..1 and the brightest
cell is 1; an image with no cell pushing towards adenocarcinoma gets all zeros
rather than amplified noise. The grid is VGG16's last conv layer
(``image_size // 16`` cells a side): clients upsample it to overlay the image.

The gradient is taken with ``tf.gradients``, so :func:`heatmap` runs inside a
``tf.function`` (every exported signature is one).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from chest_ct.forward import Forward


def head_logit(head: keras.Model, features: tf.Tensor) -> tf.Tensor:
    """The head's score before its sigmoid, ``[N]``: the same layers, the last one without its activation."""
    *body, last = head.layers
    if not isinstance(last, keras.layers.Dense) or last.activation is not keras.activations.sigmoid:
        raise ValueError(f"head {head.name!r} must end in a Dense layer with a sigmoid; got {last.name!r}")
    x = features
    for layer in body:
        x = layer(x, training=False)
    logit = tf.matmul(x, last.kernel)
    if last.use_bias:
        logit = logit + last.bias
    return tf.reshape(logit, [-1])


def heatmap(conv: tf.Tensor, score: tf.Tensor) -> tf.Tensor:
    """Grad-CAM of ``score`` (``[N]``) over ``conv`` (``[N, h, w, C]``): float32 ``[N, h, w]`` in 0..1.

    Each image's score depends only on its own activations, so the gradient of
    the summed scores gives every image's own gradient in one backward pass.
    """
    (grads,) = tf.gradients(tf.reduce_sum(score), [conv])
    weights = tf.reduce_mean(grads, axis=[1, 2])  # [N, C]: channel importance
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", conv, weights))  # evidence for the class only
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(cam, peak)


def explain(forward: Forward, head: keras.Model) -> tf.Tensor:
    """The Grad-CAM map of the positive class's score for one forward pass."""
    return heatmap(forward.conv, head_logit(head, forward.features))
