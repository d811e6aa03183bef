"""Export the trained model as a self-contained TensorFlow SavedModel for serving.

Every signature is one *input kind* followed by one *head*, so what train and
serve must agree on (decoding, resizing, VGG16 preprocessing, and everything a
head computes) is written once, here and in :mod:`chest_ct.preprocess`:

- ``serving_default(images: string [N])``: encoded PNG/JPEG files; decoding,
  resizing and VGG16 preprocessing happen in the graph.
- ``serve_pixels(pixels: float32 [N, H, W, 3])``: RGB pixels in 0..255 of any size.
- ``explain_images`` and ``explain_pixels``: the same inputs, plus ``heatmap``.

All return ``probability`` (float32 ``[N]``, of the positive class); the explain
signatures also return ``heatmap`` (float32 ``[N, h, w]``, 0..1), the Grad-CAM
map of that score over VGG16's last conv layer (:mod:`chest_ct.gradcam`). The
network runs once per call (:class:`chest_ct.forward.Forward`); heads only add outputs.

Adding an input kind (:data:`INPUT_KINDS`) or a head (:data:`HEADS`) adds its
signatures for every combination; the names are listed in :data:`SIGNATURES`.

``model_metadata.json`` beside ``saved_model.pb`` holds what a server needs to
turn probabilities into labels: class names, image size, decision threshold and
the MLflow run the model came from. The serving code reads only this folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from chest_ct import CLASS_NAMES, POSITIVE_CLASS, gradcam
from chest_ct.forward import LAST_CONV_LAYER, Forward, SplitModel, conv_grid
from chest_ct.model import image_size_of
from chest_ct.preprocess import decode_and_resize, resize, to_model_input

METADATA_FILE = "model_metadata.json"
#: Images decoded at once inside the bytes signature's map. One: a full-size decode (up to the server's pixel
#: cap, ~200 MB as float32) is held in memory at a time, at no measured cost in speed (bench/serve.py).
DECODE_PARALLELISM = 1


@dataclass(frozen=True)
class InputKind:
    """How one kind of request input becomes RGB pixels (float32 0..255) at the model's input size."""

    argument: str
    spec: tf.TensorSpec
    describe: str
    to_pixels: Callable[[tf.Tensor, int], tf.Tensor]


def _decode_batch(images: tf.Tensor, size: int) -> tf.Tensor:
    return tf.map_fn(lambda b: decode_and_resize(b, size), images, parallel_iterations=DECODE_PARALLELISM,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


INPUT_KINDS: dict[str, InputKind] = {
    "images": InputKind("images", tf.TensorSpec([None], tf.string, name="images"),
                        "encoded PNG/JPEG bytes [N]", _decode_batch),
    "pixels": InputKind("pixels", tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels"),
                        "float32 RGB 0..255 [N, H, W, 3]", resize),
}

#: A head maps the model's parts and its one forward pass on the batch to the signature's named outputs.
Head = Callable[[SplitModel, Forward], dict[str, tf.Tensor]]


def predict_head(model: SplitModel, forward: Forward) -> dict[str, tf.Tensor]:
    """The probability of the positive class, ``[N]``."""
    return {"probability": forward.probability}


def explain_head(model: SplitModel, forward: Forward) -> dict[str, tf.Tensor]:
    """The probability and its Grad-CAM map, ``[N, h, w]`` in 0..1."""
    return {"probability": forward.probability, "heatmap": gradcam.explain(forward, model.head)}


HEADS: dict[str, Head] = {"predict": predict_head, "explain": explain_head}

#: (input kind, head) -> signature name. ``serving_default`` is what generic TF tooling calls.
SIGNATURES: dict[tuple[str, str], str] = {
    ("images", "predict"): "serving_default",
    ("pixels", "predict"): "serve_pixels",
    ("images", "explain"): "explain_images",
    ("pixels", "explain"): "explain_pixels",
}
BYTES_SIGNATURE = SIGNATURES["images", "predict"]
PIXELS_SIGNATURE = SIGNATURES["pixels", "predict"]
EXPLAIN_BYTES_SIGNATURE = SIGNATURES["images", "explain"]


def _signature(model: SplitModel, kind: InputKind, head: Head, size: int) -> tf.types.experimental.GenericFunction:
    @tf.function(input_signature=[kind.spec])
    def serve(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        return head(model, model(to_model_input(kind.to_pixels(batch, size))))

    return serve


def export_saved_model(model: keras.Model, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the SavedModel with every signature of :data:`SIGNATURES` and its metadata; return ``out_dir``."""
    out_dir = Path(out_dir)
    size = image_size_of(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    parts = SplitModel.of(model)
    for (kind_name, head_name), signature in SIGNATURES.items():
        archive.add_endpoint(signature, _signature(parts, INPUT_KINDS[kind_name], HEADS[head_name], size))
    archive.write_out(str(out_dir), verbose=False)
    write_metadata(out_dir, {
        "format_version": 1,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "image_size": size,
        "threshold": 0.5,
        "threshold_source": "default (not yet evaluated)",
        "signatures": {signature: f"{INPUT_KINDS[kind].argument}: {INPUT_KINDS[kind].describe} -> {head}"
                       for (kind, head), signature in SIGNATURES.items()},
        "heatmap": {"grid": list(conv_grid(model)), "layer": LAST_CONV_LAYER,
                    "signatures": {kind: name for (kind, head), name in SIGNATURES.items() if head == "explain"},
                    "method": "Grad-CAM of the positive class's logit; each map divided by its maximum "
                              "(0..1, all zeros where no cell raises the score)"},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **metadata,
    })
    return out_dir


def read_metadata(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {METADATA_FILE}; expected a model exported by chest-ct")
    return json.loads(path.read_text())


def write_metadata(model_dir: Path, metadata: dict[str, Any]) -> None:
    (Path(model_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def load_predictor(model_dir: Path) -> Callable[[list[bytes]], np.ndarray]:
    """The exported bytes signature: ``predict(list_of_encoded_images) -> np.ndarray``."""
    fn = tf.saved_model.load(str(model_dir)).signatures[BYTES_SIGNATURE]

    def predict(encoded: list[bytes], batch_size: int = 32) -> np.ndarray:
        out = [fn(images=tf.constant(encoded[i:i + batch_size]))["probability"].numpy()
               for i in range(0, len(encoded), batch_size)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return predict


def predict_files(model_dir: Path, files: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Probabilities for image files, through the exported bytes signature, streamed batch by batch.

    Only one batch of encoded images is in memory at a time, however many files there are.
    """
    fn = tf.saved_model.load(str(model_dir)).signatures[BYTES_SIGNATURE]
    batches = (tf.data.Dataset.from_tensor_slices(list(files))
               .map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(1))
    out = [fn(images=batch)["probability"].numpy() for batch in batches]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
