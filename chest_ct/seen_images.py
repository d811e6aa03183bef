"""Which pictures a model has seen: stored with the model, used to keep its score honest.

Every exported model carries ``fitted_images.json`` (sha256 and perceptual hash of
every image it was fitted or early-stopped on; also an MLflow artifact of its run,
and summarised in ``model_metadata.json``). Evaluation scores a model only on test
images that are neither the same file nor a near copy of any of them, and compares
challenger and champion only on test images that neither has seen, however the
splits have moved between their runs.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chest_ct.duplicates import DEFAULT_PHASH_DISTANCE, group_duplicates
from chest_ct.records import ImageRecord

SEEN_FILE = "fitted_images.json"


@dataclass(frozen=True)
class SeenImage:
    sha256: str
    phash: str
    split: str


def write_seen(model_dir: Path, records: Iterable[ImageRecord]) -> dict[str, Any]:
    """Write the list into ``model_dir``; return the summary that goes into the model metadata."""
    seen = sorted({SeenImage(r.sha256, r.phash, r.split) for r in records}, key=lambda s: (s.split, s.sha256))
    text = json.dumps({"images": [asdict(s) for s in seen]}, indent=0)
    (Path(model_dir) / SEEN_FILE).write_text(text)
    return {"file": SEEN_FILE, "count": len(seen), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def read_seen(model_dir: Path) -> list[SeenImage] | None:
    """The model's list, or None for a model exported before models carried one."""
    path = Path(model_dir) / SEEN_FILE
    if not path.is_file():
        return None
    return [SeenImage(**s) for s in json.loads(path.read_text())["images"]]


def split_unseen(
    candidates: Sequence[ImageRecord], seen: Sequence[SeenImage], *, max_distance: int = DEFAULT_PHASH_DISTANCE
) -> tuple[list[ImageRecord], dict[str, str]]:
    """``(records not seen, {path: why excluded})``: same bytes, or a near copy, of a seen image."""
    if not seen:
        return list(candidates), {}
    groups = group_duplicates(
        [s.sha256 for s in seen] + [r.sha256 for r in candidates],
        [s.phash for s in seen] + [r.phash for r in candidates],
        max_distance=max_distance,
    )
    seen_in: dict[int, set[str]] = defaultdict(set)
    exact = {s.sha256 for s in seen}
    for s, g in zip(seen, groups[: len(seen)], strict=True):
        seen_in[g].add(s.split)
    kept, excluded = [], {}
    for r, g in zip(candidates, groups[len(seen) :], strict=True):
        if g in seen_in:
            kind = "same file as" if r.sha256 in exact else "near copy of"
            excluded[r.path] = f"{kind} an image it saw in {'/'.join(sorted(seen_in[g]))}"
        else:
            kept.append(r)
    return kept, excluded
