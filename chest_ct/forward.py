"""One forward pass of the classifier, split where heads need to look inside it.

Every signature of the exported model runs the network once and hands the
result to its head: ``predict`` reads the probability, ``explain`` also reads
the last convolutional layer's activations (Grad-CAM), and the out-of-distribution
guard reads the pooled features after each VGG16 block (:data:`chest_ct.ood.BLOCKS`).
Nothing is computed twice, and the split runs exactly the layers ``model(x)`` runs, in the
same order, so every head sees the probability the server returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from chest_ct.model import split_model
from chest_ct.ood import BLOCKS

#: VGG16's last convolutional layer: Grad-CAM's target, ``image_size // 16`` cells a side.
LAST_CONV_LAYER = "block5_conv3"


@dataclass(frozen=True)
class Forward:
    """What the network computed on one batch of model inputs."""

    conv: tf.Tensor  #: ``[N, h, w, C]`` activations of :data:`LAST_CONV_LAYER`
    features: tf.Tensor  #: ``[N, F]`` the base's pooled output, the head's input
    probability: tf.Tensor  #: ``[N]`` of the positive class
    #: image-averaged feature maps after each block of :data:`chest_ct.ood.BLOCKS` (the last is ``features``)
    pooled: tuple[tf.Tensor, ...] = ()


@dataclass(frozen=True)
class SplitModel:
    """The classifier as three parts: base up to the last conv layer, the rest of the base, the head."""

    to_conv: list[keras.layers.Layer]
    after_conv: list[keras.layers.Layer]
    head: keras.Model

    @classmethod
    def of(cls, model: keras.Model) -> SplitModel:
        """Split a model made by :func:`chest_ct.model.build_model` (VGG16 is a chain of layers)."""
        base, head = split_model(model)
        layers = base.layers[1:]  # after the InputLayer
        names = [layer.name for layer in layers]
        if LAST_CONV_LAYER not in names:
            raise ValueError(f"base {base.name!r} has no layer {LAST_CONV_LAYER!r}; expected VGG16")
        cut = names.index(LAST_CONV_LAYER) + 1
        return cls(to_conv=layers[:cut], after_conv=layers[cut:], head=head)

    def __call__(self, model_input: tf.Tensor) -> Forward:
        pooled: list[tf.Tensor] = []
        x = model_input
        for layer in self.to_conv:
            x = self._step(layer, x, pooled)
        conv = x
        for layer in self.after_conv:
            x = self._step(layer, x, pooled)
        probability = tf.reshape(self.head(x, training=False), [-1])
        return Forward(conv=conv, features=x, probability=probability, pooled=(*pooled, x))

    @staticmethod
    def _step(layer: keras.layers.Layer, x: tf.Tensor, pooled: list[tf.Tensor]) -> tf.Tensor:
        x = layer(x)
        if layer.name in BLOCKS[:-1]:  # the last block's average is the base's own output
            pooled.append(tf.reduce_mean(x, axis=[1, 2]))
        return x


def conv_grid(model: keras.Model) -> tuple[int, int]:
    """``(h, w)`` of the last conv layer's activations for this model's input size."""
    base, _ = split_model(model)
    _, h, w, _ = base.get_layer(LAST_CONV_LAYER).output.shape
    return int(h), int(w)
