"""Export the trained model as a self-contained TensorFlow SavedModel for serving.

Signatures (both return ``{"probability": float32 [N]}``, the probability of the
positive class):

- ``serving_default(images: string [N])``: encoded PNG/JPEG files; decoding,
  resizing and VGG16 preprocessing happen in the graph.
- ``serve_pixels(pixels: float32 [N, H, W, 3])``: RGB pixels in 0..255 of any size.

``model_metadata.json`` beside ``saved_model.pb`` holds what a server needs to
turn probabilities into labels: class names, image size, decision threshold and
the MLflow run the model came from. The serving code reads only this folder.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import keras
import tensorflow as tf

from chest_ct import CLASS_NAMES, POSITIVE_CLASS
from chest_ct.model import image_size_of
from chest_ct.preprocess import decode_and_resize, resize, to_model_input

METADATA_FILE = "model_metadata.json"
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serve_pixels"


def export_saved_model(model: keras.Model, out_dir: Path, metadata: dict) -> Path:
    """Write the SavedModel and its metadata to ``out_dir``; return ``out_dir``."""
    out_dir = Path(out_dir)
    size = image_size_of(model)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_bytes(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(lambda b: decode_and_resize(b, size), images, parallel_iterations=1,  # 1 decode in memory
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return {"probability": tf.reshape(model(to_model_input(pixels), training=False), [-1])}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
    def serve_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probability": tf.reshape(model(to_model_input(resize(pixels, size)), training=False), [-1])}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes)
    archive.add_endpoint(PIXELS_SIGNATURE, serve_pixels)
    archive.write_out(str(out_dir), verbose=False)
    write_metadata(out_dir, {
        "format_version": 1,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "image_size": size,
        "threshold": 0.5,
        "threshold_source": "default (not yet evaluated)",
        "signatures": {BYTES_SIGNATURE: "images: encoded PNG/JPEG bytes [N]",
                       PIXELS_SIGNATURE: "pixels: float32 RGB 0..255 [N, H, W, 3]"},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    })
    return out_dir


def read_metadata(model_dir: Path) -> dict:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {METADATA_FILE}; expected a model exported by chest-ct")
    return json.loads(path.read_text())


def write_metadata(model_dir: Path, metadata: dict) -> None:
    (Path(model_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def load_predictor(model_dir: Path):
    """The exported bytes signature: ``predict(list_of_encoded_images) -> np.ndarray``."""
    loaded = tf.saved_model.load(str(model_dir))
    fn = loaded.signatures[BYTES_SIGNATURE]

    def predict(encoded: list[bytes], batch_size: int = 32):
        import numpy as np

        out = [fn(images=tf.constant(encoded[i:i + batch_size]))["probability"].numpy()
               for i in range(0, len(encoded), batch_size)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return predict
