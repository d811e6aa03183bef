"""The warm-up calls a model answers before the server reports ready.

Every signature is called once on a small synthetic image (TensorFlow traces and
optimizes each function on its first call, so no client pays for that), its
answers are checked (a model that answers nonsense is refused at start), and one
image is timed through the predict and the explain signatures: the batching
engine's first estimate of each pace, which admission uses until real calls
refine it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from serving.model_dir import EXPLAIN_SIGNATURES, ModelInfo, ModelLoadError
from serving.runner import HEATMAP_KEY, SavedModelRunner


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up calls measured."""

    seconds_per_image: float  # one image through serving_default
    explain_seconds_per_image: float | None = None  # one image through explain_images (None: no explain signatures)
    heatmap_grid: tuple[int, int] | None = None  # (h, w) of the heatmap


def warm_up(runner: SavedModelRunner, info: ModelInfo) -> WarmUp:
    """Run every signature (traces them, proves the model answers sensibly); time one image through each family.

    The explain signatures must return a finite heatmap in 0..1 of one grid for every input kind, and the
    grid the metadata declares (``heatmap.grid``), when it declares one.
    """
    size = info.image_size
    rgb = np.linspace(0, 255, size * size * 3).reshape(size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    hu = np.linspace(-1000, 400, size * size, dtype=np.float32).reshape(1, size, size)
    grids = set()
    for explain in (False, True) if runner.has_explain else (False,):
        for name, out in (
            ("serving_default", runner.predict_images([png], explain)),
            ("serve_pixels", runner.predict_pixels(rgb[None].astype(np.float32), explain)),
            ("serve_hu", runner.predict_hu(hu, explain)),
        ):
            name = EXPLAIN_SIGNATURES[name] if explain else name
            probs, scores = out["probability"], out["ood_score"]
            if (
                out.shape != (1,)
                or not np.all(np.isfinite(probs))
                or not 0.0 <= float(probs[0]) <= 1.0
                or not np.all(np.isfinite(scores))
            ):
                raise ModelLoadError(
                    f"warm-up call of signature '{name}' returned {out!r}; expected one "
                    "probability in [0, 1] and a finite ood_score"
                )
            if explain:
                heatmap = out[HEATMAP_KEY]
                if heatmap.ndim != 3 or not np.all(np.isfinite(heatmap)) or heatmap.min() < 0 or heatmap.max() > 1:
                    raise ModelLoadError(
                        f"warm-up call of signature '{name}' returned a heatmap of shape "
                        f"{heatmap.shape[1:]} with values {heatmap.min():g}..{heatmap.max():g}; "
                        "expected a finite [h, w] map in 0..1"
                    )
                grids.add(heatmap.shape[1:])
    grid = None
    if grids:
        declared = (
            (info.extra.get("heatmap") or {}).get("grid") if isinstance(info.extra.get("heatmap"), dict) else None
        )
        if len(grids) > 1 or (declared is not None and [tuple(declared)] != list(grids)):
            raise ModelLoadError(
                f"the explain signatures return heatmaps of {sorted(grids)} but "
                f"model_metadata.json declares heatmap.grid {declared!r}"
            )
        (grid,) = grids
    return WarmUp(
        _seconds(lambda: runner.predict_images([png])),
        _seconds(lambda: runner.predict_images([png], True)) if grid else None,
        grid,
    )


def _seconds(call: Callable[[], Any]) -> float:
    """Seconds of one ``call()`` (at least 0.1 ms)."""
    started = time.monotonic()
    call()
    return max(1e-4, time.monotonic() - started)
