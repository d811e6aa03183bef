"""Turn a fetched dataset folder into a validated, de-duplicated, split dataset artifact.

The steps, each in its own module: :mod:`chest_ct.layout` finds the layout and
accounts for every file; :mod:`chest_ct.images` validates each candidate image;
:mod:`chest_ct.duplicates` groups copies of one picture; :mod:`chest_ct.splits`
gives every image its role; :mod:`chest_ct.ingest_report` describes the result.
The artifact's layout is in :mod:`chest_ct.records`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from chest_ct import CLASS_NAMES, defaults
from chest_ct.duplicates import DEFAULT_PHASH_DISTANCE, group_duplicates, largest_groups
from chest_ct.images import DEFAULT_MAX_PIXELS, InvalidImage, inspect_files
from chest_ct.ingest_report import QuarantinedFile, build_report
from chest_ct.layout import scan
from chest_ct.records import IMAGES_DIR, QUARANTINE_DIR, DatasetError, ImageRecord, Manifest, fingerprint
from chest_ct.splits import assign_roles, check_fraction
from chest_ct.window import LUNG_WINDOW, Window

log = logging.getLogger(__name__)


def build_dataset(
    root: Path,
    out_dir: Path,
    *,
    classes: tuple[str, ...] = CLASS_NAMES,
    seed: int = defaults.SEED,
    valid_fraction: float = defaults.VALID_FRACTION,
    test_fraction: float = defaults.TEST_FRACTION,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    phash_distance: int = DEFAULT_PHASH_DISTANCE,
    source_uri: str = "",
    refused: Sequence[dict[str, str]] = (),
    workers: int | None = None,
    window: Window = LUNG_WINDOW,
) -> dict[str, Any]:
    """Validate, de-duplicate and split the dataset at ``root`` into ``out_dir``; return the report.

    ``refused``: source objects the fetch refused (e.g. S3 keys escaping the prefix), listed in the
    report. ``workers``: validation processes (default: every CPU the container may use).
    ``window``: the window DICOM slices are described through (duplicates, shortcut statistics);
    their files are kept as they are, in Hounsfield units.
    """
    check_fraction("valid_fraction", valid_fraction)
    check_fraction("test_fraction", test_fraction)
    root, out_dir = Path(root), Path(out_dir)
    found = scan(root, classes)
    log.info(
        "%s: %d files, %d candidate images, %d ignored",
        root,
        found.files_found,
        len(found.candidates),
        len(found.ignored),
    )

    records: list[ImageRecord] = []
    quarantined: list[QuarantinedFile] = []
    # Each file is read once: the validating worker writes the bytes it hashed and decoded into the artifact.
    results = inspect_files(
        [c.file for c in found.candidates],
        max_pixels=max_pixels,
        workers=workers,
        copy_to=[out_dir / IMAGES_DIR / c.path for c in found.candidates],
        window=window,
    )
    for cand, result in zip(found.candidates, results, strict=True):
        if isinstance(result, InvalidImage):
            quarantined.append(QuarantinedFile(cand.path, cand.given_split, cand.label, str(result)))
            _copy(cand.file, out_dir / QUARANTINE_DIR / cand.path)
        else:
            records.append(ImageRecord(path=cand.path, given_split=cand.given_split, label=cand.label, image=result))
    if not records:
        raise DatasetError(
            f"{found.dataset_root}: no usable images in the class folders ({len(quarantined)} quarantined)"
        )

    shas, phashes, names = [r.sha256 for r in records], [r.phash for r in records], [r.path for r in records]
    groups = group_duplicates(shas, phashes, max_distance=phash_distance, names=names)
    records = [replace(r, group=g) for r, g in zip(records, groups, strict=True)]
    records = assign_roles(records, seed=seed, valid_fraction=valid_fraction, test_fraction=test_fraction)

    manifest = Manifest(classes=tuple(classes), records=records, fingerprint=fingerprint(records), root=out_dir)
    manifest.save(out_dir)
    report = build_report(
        manifest,
        found,
        quarantined,
        source_uri=source_uri,
        seed=seed,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        refused=list(refused),
        largest_groups=[asdict(g) for g in largest_groups(groups, shas, phashes, names=names)],
    )
    log.info("dataset %s: %s", manifest.fingerprint[:16], report["files"])
    return report


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
