"""Export the trained model as a self-contained TensorFlow SavedModel for serving.

Every signature is one *input kind* followed by one *head*, so what train and
serve must agree on (decoding, windowing, resizing, VGG16 preprocessing, the
out-of-distribution guard and everything a head computes) is written once, here,
in :mod:`chest_ct.preprocess`, :mod:`chest_ct.forward` and :mod:`chest_ct.ood`:

- ``serving_default(images: string [N])``: encoded PNG/JPEG files; decoding,
  resizing and VGG16 preprocessing happen in the graph.
- ``serve_pixels(pixels: float32 [N, H, W, 3])``: RGB pixels in 0..255 of any size.
- ``serve_hu(hu: float32 [N, H, W])``: CT slices in Hounsfield units (a DICOM
  file's pixels after its rescale); the lung window (:class:`chest_ct.window.Window`,
  fixed at export and recorded in the metadata) turns them into grey levels.
- ``explain_images``, ``explain_pixels``, ``explain_hu``: the same inputs, plus ``heatmap``.

Each returns ``probability`` (float32 ``[N]``, of the positive class), plus
``ood_score`` (float32 ``[N]``) and ``in_distribution`` (bool ``[N]``) from the
guard; the explain signatures also return ``heatmap`` (float32 ``[N, h, w]``,
0..1), the Grad-CAM map of that score over VGG16's last conv layer
(:mod:`chest_ct.gradcam`). The network runs once per call
(:class:`chest_ct.forward.Forward`); heads only add outputs, and the guard reads
the pooled features of that same pass, so every head carries the guard's outputs.

Adding an input kind (:data:`INPUT_KINDS`) or a head (:data:`HEADS`) adds its
signatures for every combination; the names are listed in :data:`SIGNATURES`.

``model_metadata.json`` beside ``saved_model.pb`` holds what a server needs to
turn probabilities into labels: class names, image size, decision threshold,
window, the guard's threshold, the heatmap grid and the MLflow run the model
came from. The serving code reads only this folder. Running the exported model
in-process (evaluation, benchmarks) is :mod:`chest_ct.predict`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from chest_ct import CLASS_NAMES, POSITIVE_CLASS, gradcam
from chest_ct.forward import LAST_CONV_LAYER, Forward, SplitModel, conv_grid
from chest_ct.model import image_size_of
from chest_ct.ood import Guard, GuardGraph
from chest_ct.preprocess import decode_and_resize, hu_to_pixels, resize, to_model_input
from chest_ct.window import LUNG_WINDOW, Window

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
    return tf.map_fn(
        lambda b: decode_and_resize(b, size),
        images,
        parallel_iterations=DECODE_PARALLELISM,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
    )


INPUT_KINDS: dict[str, InputKind] = {
    "images": InputKind(
        "images", tf.TensorSpec([None], tf.string, name="images"), "encoded PNG/JPEG bytes [N]", _decode_batch
    ),
    "pixels": InputKind(
        "pixels",
        tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels"),
        "float32 RGB 0..255 [N, H, W, 3]",
        lambda pixels, size, window: resize(pixels, size),
    ),
    "hu": InputKind(
        "hu",
        tf.TensorSpec([None, None, None], tf.float32, name="hu"),
        "float32 Hounsfield units [N, H, W] (CT slices), through the lung window",
        lambda hu, size, window: resize(hu_to_pixels(hu, window), size),
    ),
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
    ("hu", "predict"): "serve_hu",
    ("images", "explain"): "explain_images",
    ("pixels", "explain"): "explain_pixels",
    ("hu", "explain"): "explain_hu",
}
BYTES_SIGNATURE = SIGNATURES["images", "predict"]
PIXELS_SIGNATURE = SIGNATURES["pixels", "predict"]
HU_SIGNATURE = SIGNATURES["hu", "predict"]
EXPLAIN_BYTES_SIGNATURE = SIGNATURES["images", "explain"]
#: What every signature returns besides its head's outputs.
GUARD_OUTPUTS = ("ood_score", "in_distribution")


def _signature(
    model: SplitModel, guard: GuardGraph, kind: InputKind, head: Head, size: int, window: Window
) -> tf.types.experimental.GenericFunction:
    @tf.function(input_signature=[kind.spec])
    def serve(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        forward = model(to_model_input(kind.to_pixels(batch, size, window)))
        return {**head(model, forward), **guard(forward.pooled)}

    return serve


def export_saved_model(
    model: keras.Model, out_dir: Path, metadata: dict[str, Any], *, guard: Guard, window: Window = LUNG_WINDOW
) -> Path:
    """Write the SavedModel with every signature of :data:`SIGNATURES` and its metadata; return ``out_dir``.

    ``guard``: the fitted out-of-distribution guard (:func:`chest_ct.ood.fit_guard`), in every
    signature. ``window``: how ``serve_hu`` turns Hounsfield units into grey levels; training used it too.
    """
    out_dir = Path(out_dir)
    size = image_size_of(model)
    parts, guard_graph = SplitModel.of(model), GuardGraph(guard)
    # No ``archive.track(model)``: the archive already saves every variable the signatures capture (the
    # underlying tf.Variables), and track() would add the keras.Variable wrappers of the same weights as a
    # second collection that TensorFlow cannot tell apart, so every weight would be written and loaded twice
    # (keras-team/keras#23553). Nothing here needs what track() adds (lookup tables, ``loaded.variables``).
    archive = keras.export.ExportArchive()
    for (kind_name, head_name), signature in SIGNATURES.items():
        archive.add_endpoint(
            signature, _signature(parts, guard_graph, INPUT_KINDS[kind_name], HEADS[head_name], size, window)
        )
    archive.write_out(str(out_dir), verbose=False)
    write_metadata(
        out_dir,
        {
            "format_version": 1,
            "class_names": list(CLASS_NAMES),
            "positive_class": POSITIVE_CLASS,
            "image_size": size,
            "threshold": 0.5,
            "threshold_source": "default (not yet evaluated)",
            "window": window.to_dict(),
            "ood": guard.metadata(),
            "signatures": {
                signature: f"{INPUT_KINDS[kind].argument}: {INPUT_KINDS[kind].describe} -> {head}, "
                + ", ".join(GUARD_OUTPUTS)
                for (kind, head), signature in SIGNATURES.items()
            },
            "heatmap": {
                "grid": list(conv_grid(model)),
                "layer": LAST_CONV_LAYER,
                "signatures": {kind: name for (kind, head), name in SIGNATURES.items() if head == "explain"},
                "method": "Grad-CAM of the positive class's logit; each map divided by its maximum "
                "(0..1, all zeros where no cell raises the score)",
            },
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **metadata,
        },
    )
    return out_dir


def read_metadata(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {METADATA_FILE}; expected a model exported by chest-ct")
    return json.loads(path.read_text())


def write_metadata(model_dir: Path, metadata: dict[str, Any]) -> None:
    (Path(model_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
