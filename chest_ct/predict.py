"""Run an exported chest-ct SavedModel in this process: evaluation, the guard's rates, benchmarks.

The same signatures the server calls, on files: PNG/JPEG through the bytes
signature, DICOM (by content) read with :mod:`serving.dicom`, as the server's
``dicom`` input reads it, through ``serve_hu``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from chest_ct.export import BYTES_SIGNATURE, GUARD_OUTPUTS, SIGNATURES
from chest_ct.images import DEFAULT_MAX_PIXELS
from serving.dicom import is_dicom, read_hu


def load_predictor(model_dir: Path) -> Callable[[list[bytes]], np.ndarray]:
    """The exported bytes signature: ``predict(list_of_encoded_images) -> np.ndarray``."""
    fn = tf.saved_model.load(str(model_dir)).signatures[BYTES_SIGNATURE]

    def predict(encoded: list[bytes], batch_size: int = 32) -> np.ndarray:
        out = [
            fn(images=tf.constant(encoded[i : i + batch_size]))["probability"].numpy()
            for i in range(0, len(encoded), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return predict


def predict_files(model_dir: Path, files: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Probabilities for image and DICOM files, through the exported signatures (see :func:`predict_outputs`)."""
    return predict_outputs(model_dir, files, batch_size)["probability"]


class Predictor:
    """The exported signatures of one head on encoded files: PNG/JPEG through the images signature,
    DICOM through the ``hu`` one.

    ``head``: ``predict`` (probability and the guard's outputs) or ``explain`` (also ``heatmap``).
    DICOM files (by content) are read with :mod:`serving.dicom`, as the server's ``dicom``
    input reads them, and sent one slice per call (slices may differ in size). A model
    exported before DICOM and the guard (a champion from an earlier version) still scores
    PNG/JPEG files, with ``probability`` only.
    """

    KEYS = ("probability", *GUARD_OUTPUTS, "heatmap")

    def __init__(self, model_dir: Path, head: str = "predict"):
        if ("images", head) not in SIGNATURES:
            raise ValueError(f"head {head!r}: expected one of {sorted({h for _, h in SIGNATURES})}")
        self.model_dir, self.head = Path(model_dir), head
        self._signatures = tf.saved_model.load(str(model_dir)).signatures

    def __call__(self, encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
        rows: list[dict[str, np.ndarray] | None] = [None] * len(encoded)
        images = [i for i, data in enumerate(encoded) if not is_dicom(data)]
        if images:
            result = self._signature("images")(images=tf.constant([encoded[i] for i in images]))
            for row, i in enumerate(images):
                rows[i] = {k: v.numpy()[row] for k, v in result.items()}
        for i, data in enumerate(encoded):
            if rows[i] is None:
                result = self._signature("hu")(hu=tf.constant(read_hu(data, DEFAULT_MAX_PIXELS)[None]))
                rows[i] = {k: v.numpy()[0] for k, v in result.items()}
        keys = [k for k in self.KEYS if all(k in r for r in rows)]  # type: ignore[operator]
        return {
            k: np.asarray([r[k] for r in rows], np.bool_ if k == "in_distribution" else np.float32)  # type: ignore[index]
            for k in keys
        }

    def _signature(self, kind: str):
        name = SIGNATURES[kind, self.head]
        if name not in self._signatures:
            raise ValueError(
                f"{self.model_dir} has no '{name}' signature (a model exported before "
                f"{'DICOM support' if kind == 'hu' else 'this head existed'}): it cannot "
                f"{'score DICOM files' if kind == 'hu' else 'answer ' + self.head}"
            )
        return self._signatures[name]


def predict_outputs(model_dir: Path, files: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every output (probability, ood_score, in_distribution) for image and DICOM files, in file order.

    Only one batch of files is in memory at a time, however many files there are.
    """
    predictor, files = Predictor(model_dir), list(files)
    parts = [
        predictor([Path(f).read_bytes() for f in files[i : i + batch_size]]) for i in range(0, len(files), batch_size)
    ] or [predictor([])]
    return {k: np.concatenate([p[k] for p in parts]) for k in Predictor.KEYS if all(k in p for p in parts)}
