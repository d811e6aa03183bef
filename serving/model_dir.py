"""Check an exported model directory and read what the server needs from it.

Nothing here imports TensorFlow, so a wrong ``--model_dir`` is reported within
a second of starting instead of after the slow TensorFlow import, and the
messages say what is wrong in terms of the export format rather than as a
TensorFlow stack trace.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Written next to ``saved_model.pb`` by the export step (``chest_ct/export.py``).
METADATA_FILE = "model_metadata.json"
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serve_pixels"
HU_SIGNATURE = "serve_hu"
#: The same inputs, returning ``heatmap`` (Grad-CAM) besides the outputs above; optional (older models lack them).
EXPLAIN_SIGNATURES = {BYTES_SIGNATURE: "explain_images", PIXELS_SIGNATURE: "explain_pixels", HU_SIGNATURE: "explain_hu"}
#: The golden set written at export (``chest_ct/golden.py``): images in the model folder, their float32 answers.
GUARD_KEY = "precision_guard"


class ModelLoadError(RuntimeError):
    """The model directory cannot be served; the message says why and what was expected."""


@dataclass(frozen=True)
class GoldenSet:
    """Images stored with the model and the probabilities the float32 graph gives them."""

    files: tuple[Path, ...]
    probabilities: tuple[float, ...]
    keep_float32_ops: tuple[str, ...] = ()
    source: str = ""

    def read_images(self) -> list[bytes]:
        return [path.read_bytes() for path in self.files]


@dataclass(frozen=True)
class ModelInfo:
    """What ``model_metadata.json`` says about the model, checked."""

    class_names: tuple[str, str]
    positive_class: str
    negative_class: str
    image_size: int
    threshold: float
    threshold_source: str = ""
    #: The MLflow run that produced the model; empty for models exported outside a pipeline run.
    mlflow_run_id: str = ""
    #: The out-of-distribution guard's threshold on ``ood_score`` (the decision itself is in the graph).
    ood_threshold: float = 0.0
    #: The window ``serve_hu`` applies to Hounsfield units (level, width).
    window: tuple[float, float] = (-600.0, 1500.0)
    extra: dict[str, Any] = field(default_factory=dict)
    #: None when the model has no usable golden set; ``golden_problem`` then says why.
    golden: GoldenSet | None = None
    golden_problem: str = ""

    @property
    def version(self) -> str:
        """The model version reported to clients: the MLflow run id, or ``""`` when unknown."""
        return self.mlflow_run_id

    def label_for(self, probability: float) -> str:
        """The class for a probability of the positive class (same rule as evaluation: ``>= threshold``)."""
        return self.positive_class if probability >= self.threshold else self.negative_class


def check_model_dir(model_dir: str | Path) -> Path:
    """Return ``model_dir`` as a Path if it looks like an exported SavedModel, else raise ModelLoadError."""
    text = str(model_dir)
    if "://" in text:
        raise ModelLoadError(
            f"--model_dir {text!r} is a URI; the server reads a local directory. In KServe set "
            "storageUri on the InferenceService so the storage initializer downloads the model to /mnt/models."
        )
    path = Path(text)
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist (set --model_dir or MODEL_DIR)")
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} is not a directory")
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ModelLoadError(
            f"{path} is not a TensorFlow SavedModel: no saved_model.pb in it (found: {found or 'nothing'}). "
            "Point --model_dir at the directory written by the export step."
        )
    return path


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Read and check ``model_metadata.json`` in ``model_dir``."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no {METADATA_FILE}: the server needs the class names, image size and decision "
            "threshold stored with the model by the export/evaluate steps"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return _model_info(meta, path)


def _model_info(meta: dict[str, Any], path: Path) -> ModelInfo:
    def fail(key: str, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: '{key}' {problem}")

    missing = [k for k in ("class_names", "positive_class", "image_size", "threshold") if k not in meta]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(repr(k) for k in missing)}")
    names = meta["class_names"]
    if (
        not isinstance(names, list)
        or len(names) != 2
        or not all(isinstance(n, str) and n for n in names)
        or names[0] == names[1]
    ):
        raise fail("class_names", f"must be two different non-empty strings, got {names!r}")
    positive = meta["positive_class"]
    if positive not in names:
        raise fail("positive_class", f"must be one of {names}, got {positive!r}")
    size = meta["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise fail("image_size", f"must be a positive integer, got {size!r}")
    threshold = meta["threshold"]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or not 0.0 <= threshold <= 1.0
    ):
        raise fail("threshold", f"must be a number between 0 and 1, got {threshold!r}")
    run_id = meta.get("mlflow_run_id") or ""
    if not isinstance(run_id, str):
        raise fail("mlflow_run_id", f"must be a string, got {run_id!r}")
    ood, window = meta.get("ood"), meta.get("window")
    if not isinstance(ood, dict) or not _number(ood.get("threshold")):
        raise fail(
            "ood",
            f"must hold the out-of-distribution guard's numeric 'threshold' (a model exported before "
            f"the guard existed: re-export it), got {ood!r}",
        )
    if not isinstance(window, dict) or not _number(window.get("level")) or not _number(window.get("width")):
        raise fail("window", f"must hold the numeric 'level' and 'width' (HU) of the DICOM window, got {window!r}")
    known = {"class_names", "positive_class", "image_size", "threshold", "threshold_source", "mlflow_run_id", GUARD_KEY}
    try:
        golden, golden_problem = _golden_set(meta.get(GUARD_KEY), path.parent), ""
    except ValueError as exc:  # not fatal: the model is served in float32, and says why
        golden, golden_problem = None, str(exc)
    return ModelInfo(
        class_names=(names[0], names[1]),
        positive_class=positive,
        negative_class=names[1] if positive == names[0] else names[0],
        image_size=size,
        threshold=float(threshold),
        threshold_source=str(meta.get("threshold_source") or ""),
        mlflow_run_id=run_id,
        ood_threshold=float(ood["threshold"]),
        window=(float(window["level"]), float(window["width"])),
        extra={k: v for k, v in meta.items() if k not in known},
        golden=golden,
        golden_problem=golden_problem,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _golden_set(guard: Any, model_dir: Path) -> GoldenSet:
    """The golden set described under ``precision_guard``; ValueError says what is missing or malformed."""
    if guard is None:
        raise ValueError(f"the model has no golden set ('{GUARD_KEY}' in {METADATA_FILE}); re-export it with chest_ct")
    if not isinstance(guard, dict):
        raise ValueError(f"'{GUARD_KEY}' must be an object, got {type(guard).__name__}")  # noqa: TRY004
    names, probs = guard.get("golden_images"), guard.get("fp32_probabilities")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"'{GUARD_KEY}.golden_images' must be a non-empty list of file names, got {names!r}")
    if (
        not isinstance(probs, list)
        or len(probs) != len(names)
        or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs)
    ):
        raise ValueError(f"'{GUARD_KEY}.fp32_probabilities' must hold one probability per golden image")
    root = model_dir.resolve()
    files = []
    for name in names:
        file = (model_dir / name).resolve()
        if root not in file.parents:
            raise ValueError(f"golden image {name!r} is outside the model directory")
        if not file.is_file():
            raise ValueError(f"golden image {name!r} is missing from the model directory")
        files.append(file)
    ops = guard.get("keep_float32_ops") or []
    if not isinstance(ops, list) or not all(isinstance(op, str) and op.isalnum() for op in ops):
        raise ValueError(f"'{GUARD_KEY}.keep_float32_ops' must be a list of TensorFlow op names, got {ops!r}")
    return GoldenSet(tuple(files), tuple(float(p) for p in probs), tuple(ops), str(guard.get("source") or ""))
