"""Export the trained model as a self-contained TensorFlow SavedModel for serving.

Every signature is one *input kind* followed by one *head*, so what train and
serve must agree on (decoding, windowing, resizing, VGG16 preprocessing, the
out-of-distribution guard and everything a head computes) is written once, here,
in :mod:`chest_ct.preprocess` and in :mod:`chest_ct.ood`:

- ``serving_default(images: string [N])``: encoded PNG/JPEG files; decoding,
  resizing and VGG16 preprocessing happen in the graph.
- ``serve_pixels(pixels: float32 [N, H, W, 3])``: RGB pixels in 0..255 of any size.
- ``serve_hu(hu: float32 [N, H, W])``: CT slices in Hounsfield units (a DICOM
  file's pixels after its rescale); the lung window (:class:`chest_ct.window.Window`,
  fixed at export and recorded in the metadata) turns them into grey levels.

Each returns ``probability`` (float32 ``[N]``, of the positive class), plus
``ood_score`` (float32 ``[N]``) and ``in_distribution`` (bool ``[N]``) from the
guard. The input kind's graph runs the base once (:func:`chest_ct.ood.feature_model`);
the head reads what it needs from that :class:`Forward` pass and the guard reads
the pooled features, so every head, present or future, carries the guard's outputs.

Adding an input kind (:data:`INPUT_KINDS`) or a head (:data:`HEADS`) adds its
signatures for every combination; the names are listed in :data:`SIGNATURES`.

``model_metadata.json`` beside ``saved_model.pb`` holds what a server needs to
turn probabilities into labels: class names, image size, decision threshold,
window, the guard's threshold and the MLflow run the model came from. The
serving code reads only this folder.
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

from chest_ct import CLASS_NAMES, POSITIVE_CLASS
from chest_ct.images import DEFAULT_MAX_PIXELS
from chest_ct.model import image_size_of, split_model
from chest_ct.ood import Guard, GuardGraph, feature_model
from chest_ct.preprocess import decode_and_resize, hu_to_pixels, resize, to_model_input
from chest_ct.window import LUNG_WINDOW, Window
from serving.dicom import is_dicom, read_hu

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
    to_pixels: Callable[[tf.Tensor, int, Window], tf.Tensor]


def _decode_batch(images: tf.Tensor, size: int, window: Window) -> tf.Tensor:
    return tf.map_fn(lambda b: decode_and_resize(b, size), images, parallel_iterations=DECODE_PARALLELISM,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


INPUT_KINDS: dict[str, InputKind] = {
    "images": InputKind("images", tf.TensorSpec([None], tf.string, name="images"),
                        "encoded PNG/JPEG bytes [N]", _decode_batch),
    "pixels": InputKind("pixels", tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels"),
                        "float32 RGB 0..255 [N, H, W, 3]", lambda pixels, size, window: resize(pixels, size)),
    "hu": InputKind("hu", tf.TensorSpec([None, None, None], tf.float32, name="hu"),
                    "float32 Hounsfield units [N, H, W] (CT slices), through the lung window",
                    lambda hu, size, window: resize(hu_to_pixels(hu, window), size)),
}


@dataclass(frozen=True)
class Forward:
    """One pass of the base over a batch: what every head may read.

    ``pooled`` holds the base's pooled features after each block of
    :data:`chest_ct.ood.BLOCKS`; ``pooled[-1]`` is the base's output, the classifier
    head's input. The guard reads ``pooled``, so a head that runs its own pass (for
    gradients, say) still gets the guard's outputs from this one.
    """

    model_input: tf.Tensor
    pooled: list[tf.Tensor]

    @property
    def features(self) -> tf.Tensor:
        return self.pooled[-1]


#: A head maps ``(model, forward pass)`` to the signature's named outputs.
Head = Callable[[keras.Model, Forward], dict[str, tf.Tensor]]


def predict_head(model: keras.Model, forward: Forward) -> dict[str, tf.Tensor]:
    """The probability of the positive class, ``[N]`` (the classifier head on the pass's features)."""
    _, head = split_model(model)
    return {"probability": tf.reshape(head(forward.features, training=False), [-1])}


HEADS: dict[str, Head] = {"predict": predict_head}

#: (input kind, head) -> signature name. ``serving_default`` is what generic TF tooling calls.
SIGNATURES: dict[tuple[str, str], str] = {
    ("images", "predict"): "serving_default",
    ("pixels", "predict"): "serve_pixels",
    ("hu", "predict"): "serve_hu",
}
BYTES_SIGNATURE = SIGNATURES["images", "predict"]
PIXELS_SIGNATURE = SIGNATURES["pixels", "predict"]
HU_SIGNATURE = SIGNATURES["hu", "predict"]
#: What every signature returns besides its head's outputs.
GUARD_OUTPUTS = ("ood_score", "in_distribution")


def _signature(features: keras.Model, model: keras.Model, guard: GuardGraph, kind: InputKind, head: Head, size: int,
               window: Window) -> tf.types.experimental.GenericFunction:
    @tf.function(input_signature=[kind.spec])
    def serve(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        model_input = to_model_input(kind.to_pixels(batch, size, window))
        forward = Forward(model_input, list(features(model_input, training=False)))
        return {**head(model, forward), **guard(forward.pooled)}

    return serve


def export_saved_model(model: keras.Model, out_dir: Path, metadata: dict[str, Any], *, guard: Guard,
                       window: Window = LUNG_WINDOW) -> Path:
    """Write the SavedModel with every signature of :data:`SIGNATURES` and its metadata; return ``out_dir``.

    ``guard``: the fitted out-of-distribution guard (:func:`chest_ct.ood.fit_guard`), in every
    signature. ``window``: how ``serve_hu`` turns Hounsfield units into grey levels; training used it too.
    """
    out_dir = Path(out_dir)
    size = image_size_of(model)
    features, guard_graph = feature_model(model), GuardGraph(guard)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for (kind_name, head_name), signature in SIGNATURES.items():
        archive.add_endpoint(signature, _signature(features, model, guard_graph, INPUT_KINDS[kind_name],
                                                   HEADS[head_name], size, window))
    archive.write_out(str(out_dir), verbose=False)
    write_metadata(out_dir, {
        "format_version": 1,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "image_size": size,
        "threshold": 0.5,
        "threshold_source": "default (not yet evaluated)",
        "window": window.to_dict(),
        "ood": guard.metadata(),
        "signatures": {signature: f"{INPUT_KINDS[kind].argument}: {INPUT_KINDS[kind].describe} -> {head}, "
                                  + ", ".join(GUARD_OUTPUTS)
                       for (kind, head), signature in SIGNATURES.items()},
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
    """Probabilities for image and DICOM files, through the exported signatures (see :func:`predict_outputs`)."""
    return predict_outputs(model_dir, files, batch_size)["probability"]


class Predictor:
    """The exported signatures on encoded files: PNG/JPEG through the bytes signature, DICOM through ``serve_hu``.

    DICOM files (by content) are read with :mod:`serving.dicom`, as the server's ``dicom``
    input reads them, and sent one slice per call (slices may differ in size). A model
    exported before DICOM and the guard (a champion from an earlier version) still scores
    PNG/JPEG files, with ``probability`` only.
    """

    KEYS = ("probability", *GUARD_OUTPUTS)

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._signatures = tf.saved_model.load(str(model_dir)).signatures

    def __call__(self, encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
        rows: list[dict[str, np.ndarray] | None] = [None] * len(encoded)
        images = [i for i, data in enumerate(encoded) if not is_dicom(data)]
        if images:
            result = self._signatures[BYTES_SIGNATURE](images=tf.constant([encoded[i] for i in images]))
            for row, i in enumerate(images):
                rows[i] = {k: v.numpy()[row] for k, v in result.items()}
        for i, data in enumerate(encoded):
            if rows[i] is None:
                result = self._hu()(hu=tf.constant(read_hu(data, DEFAULT_MAX_PIXELS)[None]))
                rows[i] = {k: v.numpy()[0] for k, v in result.items()}
        keys = [k for k in self.KEYS if all(k in r for r in rows)]  # type: ignore[operator]
        return {k: np.asarray([r[k] for r in rows], np.bool_ if k == "in_distribution" else np.float32)  # type: ignore[index]
                for k in keys}

    def _hu(self):
        if HU_SIGNATURE not in self._signatures:
            raise ValueError(f"{self.model_dir} has no '{HU_SIGNATURE}' signature (a model exported before DICOM "
                             "support): it cannot score DICOM files")
        return self._signatures[HU_SIGNATURE]


def predict_outputs(model_dir: Path, files: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every output (probability, ood_score, in_distribution) for image and DICOM files, in file order.

    Only one batch of files is in memory at a time, however many files there are.
    """
    predictor, files = Predictor(model_dir), list(files)
    parts = [predictor([Path(f).read_bytes() for f in files[i:i + batch_size]])
             for i in range(0, len(files), batch_size)] or [predictor([])]
    return {k: np.concatenate([p[k] for p in parts]) for k in Predictor.KEYS if all(k in p for p in parts)}
