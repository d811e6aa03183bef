"""A Grad-CAM gallery of the test split: true and false positives and negatives, as the model explains them.

The maps come from the exported SavedModel's explain signature (named in its
``model_metadata.json``), the graph the server runs, so the gallery shows what the
served model looks at. One image per duplicate group: four copies of one normal
picture are one example, not four. Within a case the most telling come first:
the most confident true positives and negatives, the most confidently wrong
false positives and negatives.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from chest_ct.export import read_metadata
from chest_ct.images import DEFAULT_MAX_PIXELS
from chest_ct.predict import Predictor
from chest_ct.window import LUNG_WINDOW, Window
from serving.dicom import is_dicom, read_hu

TRUE_POSITIVE, FALSE_NEGATIVE = "true positive", "false negative"
FALSE_POSITIVE, TRUE_NEGATIVE = "false positive", "true negative"
CASES = (TRUE_POSITIVE, FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_NEGATIVE)
PER_CASE = 4
TILE = 150  # pixels a side of each of the two panels (scan, overlay)
OVERLAY_OPACITY = 0.55


@dataclass(frozen=True)
class Explained:
    """One test image with its probability and Grad-CAM map from the exported model."""

    path: str
    label: str
    case: str
    group: int
    probability: float
    heatmap: np.ndarray  # [h, w] in 0..1
    tile_png: bytes  # the scan as the model sees it (square) beside the overlay


def case_of(label: int, probability: float, threshold: float) -> str:
    predicted = probability >= threshold
    if label == 1:
        return TRUE_POSITIVE if predicted else FALSE_NEGATIVE
    return FALSE_POSITIVE if predicted else TRUE_NEGATIVE


def select(
    y: npt.ArrayLike, prob: npt.ArrayLike, groups: npt.ArrayLike, threshold: float, per_case: int = PER_CASE
) -> dict[str, list[int]]:
    """Indices to show per case: one image per group, most confident (or most wrong) first.

    Cases predicted positive are ordered by falling probability, cases predicted
    negative by rising probability.
    """
    y, p, g = np.asarray(y, int), np.asarray(prob, float), np.asarray(groups)
    chosen: dict[str, list[int]] = {case: [] for case in CASES}
    shown: dict[str, set[int]] = {case: set() for case in CASES}
    falling, rising = np.argsort(-p, kind="stable"), np.argsort(p, kind="stable")
    for case, order in (
        (TRUE_POSITIVE, falling),
        (FALSE_POSITIVE, falling),
        (FALSE_NEGATIVE, rising),
        (TRUE_NEGATIVE, rising),
    ):
        for i in order.tolist():
            if len(chosen[case]) == per_case:
                break
            if case_of(int(y[i]), float(p[i]), threshold) == case and int(g[i]) not in shown[case]:
                chosen[case].append(i)
                shown[case].add(int(g[i]))
    return chosen


def explain_files(model_dir: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(probability [N], heatmap [N, h, w])`` from the model's explain signatures for image and DICOM files."""
    metadata = read_metadata(model_dir)
    if not metadata.get("heatmap", {}).get("signatures"):
        raise ValueError(f"{model_dir}: the model has no explain signature; re-export it with this chest-ct version")
    if not files:
        return np.zeros((0,), np.float32), np.zeros((0, *metadata["heatmap"]["grid"]), np.float32)
    out = Predictor(model_dir, head="explain")([Path(f).read_bytes() for f in files])
    return out["probability"], out["heatmap"]


def display_image(encoded: bytes, window: Window) -> Image.Image:
    """The picture as a person would see it: a PNG/JPEG as it is, a DICOM slice through the model's window."""
    if is_dicom(encoded):
        hu = read_hu(encoded, DEFAULT_MAX_PIXELS)
        low = window.level - window.width / 2.0
        grey = np.clip((hu - low) * (255.0 / window.width), 0, 255).astype(np.uint8)  # as chest_ct.preprocess.window_hu
        return Image.fromarray(grey, "L").convert("RGB")
    return Image.open(io.BytesIO(encoded)).convert("RGB")


def tile(encoded: bytes, heatmap: np.ndarray, size: int = TILE, window: Window = LUNG_WINDOW) -> bytes:
    """PNG: the scan resized to a square (what the model sees) beside it with the heatmap blended in."""
    from matplotlib import colormaps

    scan = display_image(encoded, window).resize((size, size), Image.Resampling.BILINEAR)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), "F").resize((size, size), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255
    alpha = (OVERLAY_OPACITY * heat)[..., None]  # cold cells stay see-through
    blended = (np.asarray(scan, float) * (1 - alpha) + colour * alpha).astype(np.uint8)
    canvas = Image.new("RGB", (2 * size + 4, size), "white")
    canvas.paste(scan, (0, 0))
    canvas.paste(Image.fromarray(blended), (size + 4, 0))
    buf = io.BytesIO()
    canvas.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def build_gallery(
    model_dir: Path,
    files: Sequence[str],
    paths: Sequence[str],
    y: npt.ArrayLike,
    prob: npt.ArrayLike,
    groups: npt.ArrayLike,
    threshold: float,
    class_names: Sequence[str],
    per_case: int = PER_CASE,
) -> dict[str, list[Explained]]:
    """The gallery, case by case; ``files`` are readable paths, ``paths`` the names shown."""
    picks = select(y, prob, groups, threshold, per_case)
    order = [i for case in CASES for i in picks[case]]
    probability, heatmaps = explain_files(model_dir, [files[i] for i in order])
    window = Window(**read_metadata(model_dir).get("window", LUNG_WINDOW.to_dict()))
    explained = {i: (float(pr), hm) for i, pr, hm in zip(order, probability, heatmaps, strict=True)}
    labels = np.asarray(y, int)
    return {
        case: [
            Explained(
                path=paths[i],
                label=class_names[labels[i]],
                case=case,
                group=int(np.asarray(groups)[i]),
                probability=explained[i][0],
                heatmap=explained[i][1],
                tile_png=tile(Path(files[i]).read_bytes(), explained[i][1], window=window),
            )
            for i in picks[case]
        ]
        for case in CASES
    }
