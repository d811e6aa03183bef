"""The golden set: a few images stored in the model folder with the answers the float32 graph gives them.

A server that wants to run the model in reduced precision first runs these images and
serves float32 instead if any probability moves by more than the tolerance or any
label flips (``serving/precision.py``). The set travels with the model (MLflow
artifact, model store, KServe's storage initializer) so the check needs nothing else.

Images are picked from the fitting data (train and valid roles), one per picture,
spread over each class's range of probabilities but none within the tolerance of the
threshold (a flip there would be rounding, not a broken reduced-precision path). They
are re-encoded as PNG at the model's input size: small files, no source metadata, and
the stored probabilities are those of exactly these bytes through the exported
``serving_default`` signature.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from chest_ct import defaults
from chest_ct.export import read_metadata, write_metadata
from chest_ct.predict import load_predictor
from chest_ct.preprocess import decode_and_resize
from serving.model_dir import GUARD_KEY

log = logging.getLogger(__name__)

GOLDEN_DIR = "golden"
#: Left in float32 by the server's bf16 rewrite: the head's Dense (VGG16's conv base has no MatMul), so the
#: probability is not rounded to bf16's 8-bit mantissa (up to 0.004 near 1) on its way out.
KEEP_FLOAT32_OPS = ("MatMul",)


def pick_golden(
    probabilities: Sequence[float] | np.ndarray,
    labels: Sequence[int],
    groups: Sequence[int],
    threshold: float,
    count: int = defaults.GOLDEN_IMAGES,
    margin: float = defaults.PRECISION_TOLERANCE,
) -> list[int]:
    """Indices of up to ``count`` images: both classes, one per picture, spread over the probabilities.

    Images within ``margin`` of ``threshold`` are left out.
    """
    p, y, g = np.asarray(probabilities, float), np.asarray(labels, int), np.asarray(groups)
    chosen: list[int] = []
    for cls, k in ((0, count // 2), (1, count - count // 2)):
        seen: set[Any] = set()
        candidates = []
        for i in np.argsort(p, kind="stable"):
            if y[i] == cls and abs(p[i] - threshold) > margin and g[i].item() not in seen:
                seen.add(g[i].item())
                candidates.append(int(i))
        if candidates and k:
            ranks = np.unique(np.linspace(0, len(candidates) - 1, min(k, len(candidates))).round().astype(int))
            chosen += [candidates[r] for r in ranks]
    return chosen


def encode_golden(files: Sequence[str], image_size: int) -> list[bytes]:
    """Each file decoded and resized as the model does, rounded to 8 bits, encoded as PNG."""
    return [
        tf.io.encode_png(
            tf.cast(tf.clip_by_value(tf.round(decode_and_resize(tf.io.read_file(f), image_size)), 0, 255), tf.uint8)
        ).numpy()
        for f in files
    ]


def write_golden_set(model_dir: Path, images: Sequence[bytes], source: str) -> dict[str, Any]:
    """Store ``images`` in ``model_dir/golden`` and their float32 probabilities in the metadata; return the entry.

    The probabilities come from the exported bytes signature itself, so a float32 server
    reproduces them to the last bit on the same CPU kind and closely on any other.
    """
    if not images:
        raise ValueError("a golden set needs at least one image")
    model_dir = Path(model_dir)
    folder = model_dir / GOLDEN_DIR
    folder.mkdir(exist_ok=True)
    names = []
    for i, data in enumerate(images):
        (folder / f"{i:02d}.png").write_bytes(data)
        names.append(f"{GOLDEN_DIR}/{i:02d}.png")
    probabilities = load_predictor(model_dir)(list(images))
    entry = {
        "golden_images": names,
        "fp32_probabilities": [float(p) for p in probabilities],
        "keep_float32_ops": list(KEEP_FLOAT32_OPS),
        "source": source,
    }
    metadata = read_metadata(model_dir)
    metadata[GUARD_KEY] = entry
    write_metadata(model_dir, metadata)
    log.info(
        "golden set: %d image(s) (%s), float32 probabilities %s",
        len(names),
        source,
        ", ".join(f"{p:.3f}" for p in probabilities),
    )
    return entry
