"""Find the dataset's layout and account for every file under its root.

Each file found is either a **candidate** image (in a class folder of a split the
pipeline uses, with an image suffix; validation decides whether it is used or
quarantined) or **ignored** with a reason: hidden or system file, loose file,
unknown top-level or class folder, a second folder for the same split (``val/``
beside ``valid/``), unsupported type. Nothing is dropped without a word.

Images are PNG, JPEG and DICOM by name (``.png``, ``.jpg``, ``.jpeg``, ``.dcm``,
``.dicom``); a file with any other name is a candidate when its content is DICOM
(``DICM`` at byte 128): scanners and PACS exports name slices ``IM000123`` or by
their UID (``1.2.840.113619....113``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from chest_ct import CLASS_NAMES
from chest_ct.images import DICOM_SUFFIXES
from chest_ct.records import TEST, TRAIN, VALID, DatasetError
from chest_ct.splits import ALL
from serving.dicom import MAGIC_OFFSET, is_dicom

SPLIT_ALIASES = {
    "train": TRAIN,
    "training": TRAIN,
    "valid": VALID,
    "val": VALID,
    "validation": VALID,
    "test": TEST,
    "testing": TEST,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
PRE_SPLIT, FLAT = "pre-split", "flat"


@dataclass(frozen=True)
class Candidate:
    """An image file to validate: ``path`` relative to the fetched root (POSIX)."""

    file: Path
    path: str
    given_split: str
    label: str


@dataclass(frozen=True)
class IgnoredFile:
    path: str
    reason: str


@dataclass
class Scan:
    layout: str
    dataset_root: Path
    files_found: int
    candidates: list[Candidate] = field(default_factory=list)
    ignored: list[IgnoredFile] = field(default_factory=list)
    ignored_classes: list[str] = field(default_factory=list)


def normalise_class_name(folder: str) -> str:
    """``adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib`` -> ``adenocarcinoma``; ``Normal`` -> ``normal``."""
    return folder.strip().split("_", 1)[0].strip().lower()


def _hidden(name: str) -> bool:
    return name.startswith((".", "__MACOSX")) or name.lower() in SYSTEM_FILES


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def unwrap(root: Path) -> Path:
    """Descend through wrapper folders (``Data/``, ``chest-ct/``) that hold nothing else.

    Stops at a split folder or a folder with files, so a train-only or one-class
    dataset is still seen for what it is.
    """
    while True:
        entries = [p for p in root.iterdir() if not _hidden(p.name)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLIT_ALIASES:
            return root
        if any(p.is_file() for p in entries[0].iterdir()):
            return root
        root = entries[0]


def _all_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are listed as files, not followed
        found += [Path(folder) / d for d in dirs if (Path(folder) / d).is_symlink()]
        found += [Path(folder) / f for f in files]
    return sorted(found)


def _split_folders(data_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``({split: chosen folder name}, {other folder name: why it is not used})``."""
    by_split: dict[str, list[str]] = defaultdict(list)
    for d in _visible_dirs(data_root):
        if d.name.lower() in SPLIT_ALIASES:
            by_split[SPLIT_ALIASES[d.name.lower()]].append(d.name)
    chosen, second = {}, {}
    for split, names in by_split.items():
        names.sort(key=lambda n: (n.lower() != split, n))  # the canonical name first, then alphabetical
        chosen[split] = names[0]
        for other in names[1:]:
            second[other] = (
                f"second folder for split '{split}': '{other}/' beside '{names[0]}/' (only '{names[0]}/' is used)"
            )
    return chosen, second


def _check_classes(where: Path, found: set[str], classes: tuple[str, ...], flat: bool) -> None:
    missing = [c for c in classes if c not in found]
    if len(missing) == len(classes):
        raise DatasetError(
            f"{where}: no class folders for {', '.join(classes)} (found {sorted(found) or 'no folders'}); "
            "expected one folder per class" + (" or split folders train/ valid/ test/" if flat else "")
        )
    if missing:
        raise DatasetError(
            f"{where}: only {sorted(set(classes) - set(missing))} present, missing class folder(s) {missing}; "
            "a classifier needs every class in every split"
        )


def scan(root: Path, classes: tuple[str, ...] = CLASS_NAMES) -> Scan:
    """Decide the layout and classify every file under ``root``; raise DatasetError when unusable."""
    root = Path(root)
    data_root = unwrap(root)
    chosen, second = _split_folders(data_root)
    layout = PRE_SPLIT if chosen else FLAT
    if chosen and TRAIN not in chosen:
        raise DatasetError(f"{data_root}: split folders {sorted(chosen)} found but no train/ folder")
    split_dirs = {name: split for split, name in chosen.items()} if chosen else {"": ALL}
    for name in split_dirs:
        folder = data_root / name
        _check_classes(folder, {normalise_class_name(d.name) for d in _visible_dirs(folder)}, classes, not chosen)

    files = _all_files(root)
    result = Scan(layout=layout, dataset_root=data_root, files_found=len(files))
    unknown_classes: set[str] = set()
    for file in files:
        rel = file.relative_to(root)
        reason, candidate = _classify(
            rel, data_root.relative_to(root), split_dirs, second, classes, unknown_classes, file
        )
        if candidate is not None:
            result.candidates.append(Candidate(file, rel.as_posix(), *candidate))
        else:
            result.ignored.append(IgnoredFile(rel.as_posix(), reason))
    result.ignored_classes = sorted(unknown_classes)
    return result


def _dicom_by_content(file: Path) -> bool:
    """Whether a file is DICOM Part 10 by its first bytes (a symlink or unreadable file is not)."""
    if file.is_symlink() or not file.is_file():
        return False
    try:
        with open(file, "rb") as fh:
            return is_dicom(fh.read(MAGIC_OFFSET + 4))
    except OSError:
        return False


def _classify(
    rel: Path,
    data_rel: Path,
    split_dirs: dict[str, str],
    second: dict[str, str],
    classes: tuple[str, ...],
    unknown_classes: set[str],
    file: Path,
) -> tuple[str, tuple[str, str] | None]:
    """``(reason ignored, None)`` or ``("", (given_split, label))`` for one file."""
    if any(_hidden(part) for part in rel.parts):
        return "hidden or system file", None
    if not rel.is_relative_to(data_rel):
        return f"outside the dataset folder '{data_rel.as_posix()}/'", None
    parts = rel.relative_to(data_rel).parts
    if "" not in split_dirs:  # pre-split
        if len(parts) == 1:
            return "loose file at the top level (expected split folders train/ valid/ test/)", None
        if parts[0] in second:
            return second[parts[0]], None
        if parts[0] not in split_dirs:
            return f"unknown top-level folder '{parts[0]}/' (expected train/, valid/ or test/)", None
        split, parts = split_dirs[parts[0]], parts[1:]
        where = f"split folder '{rel.relative_to(data_rel).parts[0]}/'"
    else:
        split, where = ALL, "the top-level folder (expected class folders)"
    if len(parts) == 1:
        return f"loose file in {where}", None
    label = normalise_class_name(parts[0])
    if label not in classes:
        unknown_classes.add(label)
        return f"unknown class folder '{parts[0]}/' (classes: {', '.join(classes)})", None
    if rel.suffix.lower() not in IMAGE_SUFFIXES and not _dicom_by_content(file):
        return (
            f"unsupported type '{rel.suffix or 'no suffix'}' (expected {', '.join(IMAGE_SUFFIXES)}, "
            "or a DICOM file by content)"
        ), None
    return "", (split, label)
