"""The SavedModel's two signatures as plain, synchronous numpy functions.

This is the only module that imports TensorFlow. Calls are split into chunks of
at most ``max_batch_size`` images so one large request cannot allocate
activations for, say, 64 images at once; the chunking does not change the
results because the model has no cross-example operations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from serving.model_dir import BYTES_SIGNATURE, PIXELS_SIGNATURE, ModelLoadError

BYTES_ARG = "images"
PIXELS_ARG = "pixels"
OUTPUT_KEY = "probability"


class ModelInputError(ValueError):
    """TensorFlow rejected an input the validation let through (e.g. an image Pillow reads but TF cannot)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class SavedModelRunner:
    """Loads the SavedModel and calls ``serving_default`` / ``serve_pixels`` on numpy data."""

    def __init__(self, model_dir: str | Path, max_batch_size: int = 16):
        import tensorflow as tf

        self._tf = tf
        self.max_batch_size = max(1, int(max_batch_size))
        try:
            self._loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:  # TF raises many types (OSError, DecodeError, InvalidArgumentError...)
            raise ModelLoadError(f"TensorFlow cannot load the SavedModel in {model_dir}: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
        signatures = getattr(self._loaded, "signatures", {})
        self._bytes_fn = _signature(signatures, BYTES_SIGNATURE, BYTES_ARG, tf.string, 1, model_dir)
        self._pixels_fn = _signature(signatures, PIXELS_SIGNATURE, PIXELS_ARG, tf.float32, 4, model_dir)

    def predict_images(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded PNG/JPEG files; ModelInputError names the first file TF cannot decode."""
        try:
            return self._chunked(self._bytes_fn, BYTES_ARG, lambda lo, hi: list(encoded[lo:hi]), len(encoded))
        except self._tf.errors.InvalidArgumentError as exc:
            for i, one in enumerate(encoded):  # find the culprit so the error can name it
                try:
                    self._call(self._bytes_fn, BYTES_ARG, [one])
                except self._tf.errors.InvalidArgumentError as one_exc:
                    raise ModelInputError(f"element {i} cannot be decoded as an image: "
                                          f"{_tf_message(one_exc)}", index=i) from one_exc
            raise ModelInputError(f"the model rejected the images: {_tf_message(exc)}") from exc

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for float32 RGB pixels ``[N, H, W, 3]`` in 0..255."""
        pixels = np.asarray(pixels, dtype=np.float32)
        try:
            return self._chunked(self._pixels_fn, PIXELS_ARG, lambda lo, hi: pixels[lo:hi], len(pixels))
        except self._tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"the model rejected the pixels: {_tf_message(exc)}") from exc

    def _chunked(self, fn, arg: str, chunk, n: int) -> np.ndarray:
        parts = [self._call(fn, arg, chunk(lo, min(lo + self.max_batch_size, n)))
                 for lo in range(0, n, self.max_batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def _call(self, fn, arg: str, values) -> np.ndarray:
        dtype = self._tf.string if arg == BYTES_ARG else self._tf.float32
        out = fn(**{arg: self._tf.constant(values, dtype=dtype)})[OUTPUT_KEY].numpy()
        return np.asarray(out, dtype=np.float32).reshape(-1)


def _signature(signatures, name: str, arg: str, dtype, rank: int, model_dir):
    if name not in signatures:
        raise ModelLoadError(f"the SavedModel in {model_dir} has no '{name}' signature "
                             f"(found: {sorted(signatures.keys())}); re-export it with chest_ct.export")
    fn = signatures[name]
    _, kwargs = fn.structured_input_signature
    spec = kwargs.get(arg)
    if spec is None or spec.dtype != dtype or spec.shape.rank != rank:
        raise ModelLoadError(f"signature '{name}' of {model_dir} must take '{arg}' as {dtype.name} "
                             f"of rank {rank}, but takes {kwargs}")
    if OUTPUT_KEY not in fn.structured_outputs:
        raise ModelLoadError(f"signature '{name}' of {model_dir} must return '{OUTPUT_KEY}', "
                             f"returns {sorted(fn.structured_outputs)}")
    return fn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tf_message(exc) -> str:
    """TF's error text without the graph node dump that follows the first line."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith("[[")]
    text = " ".join(lines)
    return text.replace("Graph execution error:", "").strip()[:300] or type(exc).__name__
