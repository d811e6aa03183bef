"""Turn a fetched dataset folder into a validated, de-duplicated, split dataset.

Output folder layout (the KFP Dataset artifact):

    manifest.json        one record per usable image, with its split and label
    images/<path>        the usable images, at their path relative to the dataset root
    quarantine/<path>    files that failed validation (listed in the report with reasons)

Splits in the manifest are roles: ``train`` is fitted on, ``valid`` drives early
stopping, ``test`` is only ever evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from chest_ct import CLASS_NAMES
from chest_ct.duplicates import DEFAULT_PHASH_DISTANCE, group_duplicates
from chest_ct.images import DEFAULT_MAX_PIXELS, InvalidImage, inspect_files

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid",
    "test": "test", "testing": "test",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """The dataset's layout or content cannot be trained on; the message says what was expected."""


def normalise_class_name(folder: str) -> str:
    """``adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib`` -> ``adenocarcinoma``; ``Normal`` -> ``normal``."""
    return folder.strip().split("_", 1)[0].strip().lower()


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for child in sorted(_visible_dirs(folder)):
        found[normalise_class_name(child.name)].append(child)
    return found


def _visible_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]


def unwrap(root: Path) -> Path:
    """Descend through wrapper folders (``Data/``, ``chest-ct/``) that hold nothing else.

    Stops at a split folder or a folder with files, so a train-only or one-class
    dataset is still seen for what it is.
    """
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLIT_ALIASES:
            return root
        if any(p.is_file() for p in entries[0].iterdir()):
            return root
        root = entries[0]


def discover(root: Path, classes: tuple[str, ...] = CLASS_NAMES) -> tuple[str, dict[str, dict[str, list[Path]]], list[str]]:
    """Find the layout and the class folders of each given split.

    Returns ``(layout, {source_split: {class: [folders]}}, ignored_classes)`` where
    layout is ``pre-split`` or ``flat`` (``source_split`` is then ``all``).
    """
    root = Path(root)
    subdirs = _visible_dirs(root)
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in subdirs if p.name.lower() in SPLIT_ALIASES}
    if split_dirs:
        layout = "pre-split"
        if "train" not in split_dirs:
            raise DatasetError(f"{root}: split folders {sorted(split_dirs)} found but no train/ folder")
        per_split = {split: _class_folders(folder) for split, folder in split_dirs.items()}
    else:
        layout = "flat"
        per_split = {"all": _class_folders(root)}

    ignored: set[str] = set()
    selected: dict[str, dict[str, list[Path]]] = {}
    for split, found in per_split.items():
        ignored |= set(found) - set(classes)
        missing = [c for c in classes if c not in found]
        where = root / split if layout == "pre-split" else root
        if len(missing) == len(classes):
            raise DatasetError(
                f"{where}: no class folders for {', '.join(classes)} "
                f"(found {sorted(found) or 'no folders'}); expected one folder per class"
                + ("" if layout == "pre-split" else " or split folders train/ valid/ test/")
            )
        if missing:
            raise DatasetError(
                f"{where}: only {sorted(set(classes) - set(missing))} present, missing class folder(s) "
                f"{missing}; a classifier needs every class in every split"
            )
        selected[split] = {c: found[c] for c in classes}
    return layout, selected, sorted(ignored)


def _carve(indices: list[int], labels: list[str], groups: list[int], fraction: float, seed: int,
           what: str) -> tuple[list[int], list[int]]:
    """Hold out about ``fraction`` of ``indices`` by whole duplicate groups, stratified by label."""
    n_splits = max(2, round(1 / fraction))
    y = [labels[i] for i in indices]
    g = [groups[i] for i in indices]
    per_class_groups = {c: len({gi for gi, yi in zip(g, y) if yi == c}) for c in set(y)}
    if min(per_class_groups.values()) < 2:
        raise DatasetError(
            f"cannot hold out a {what} split: class groups {per_class_groups} (distinct pictures per class); "
            "each class needs at least 2 distinct pictures, or supply the split folder yourself"
        )
    n_splits = min(n_splits, len(set(g)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(splitter.split(np.zeros(len(y)), y, g))
    keep_idx, held_idx = [indices[i] for i in keep], [indices[i] for i in held]
    for part, name in ((keep_idx, "remaining"), (held_idx, what)):
        present = {labels[i] for i in part}
        if present != set(y):
            raise DatasetError(
                f"holding out a {what} split by duplicate groups left the {name} part without "
                f"{sorted(set(y) - present)}; add more distinct pictures or supply the split folder yourself"
            )
    return keep_idx, held_idx


def fingerprint(records: list[dict]) -> str:
    """Content hash of the dataset as the pipeline will use it (split, label, bytes)."""
    lines = sorted(f"{r['split']}\t{r['label']}\t{r['sha256']}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def build_dataset(
    root: Path,
    out_dir: Path,
    *,
    classes: tuple[str, ...] = CLASS_NAMES,
    seed: int = 42,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    phash_distance: int = DEFAULT_PHASH_DISTANCE,
    source_uri: str = "",
) -> dict:
    """Validate, de-duplicate and split the dataset at ``root`` into ``out_dir``; return the report."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 0.5:
            raise DatasetError(f"{name}={value}: expected a fraction between 0 and 0.5")
    root, out_dir = unwrap(Path(root)), Path(out_dir)
    layout, selected, ignored_classes = discover(root, classes)

    records: list[dict] = []
    quarantined: list[dict] = []
    candidates = [(file, source_split, label) for source_split, by_class in selected.items()
                  for label, folders in by_class.items() for folder in folders
                  for file in sorted(p for p in folder.rglob("*") if p.is_file())]
    images = [file for file, _, _ in candidates if file.suffix.lower() in IMAGE_SUFFIXES]
    copies = [out_dir / "images" / file.relative_to(root) for file in images]  # written as validated: one read
    infos = dict(zip(images, inspect_files(images, max_pixels=max_pixels, copy_to=copies)))  # all cores, input order
    for file, source_split, label in candidates:
        rel = file.relative_to(root).as_posix()
        info = infos.get(file) or InvalidImage(f"not an image file (suffix {file.suffix or 'none'!r}; expected .png/.jpg/.jpeg)")
        if isinstance(info, InvalidImage):
            quarantined.append({"path": rel, "split": source_split, "label": label, "reason": str(info)})
            _copy(file, out_dir / "quarantine" / rel)
            continue
        records.append({"path": rel, "file": f"images/{rel}", "source_split": source_split,
                        "label": label, **info.to_dict()})
    if not records:
        raise DatasetError(f"{root}: no usable images in the class folders ({len(quarantined)} quarantined)")

    groups = group_duplicates([r["sha256"] for r in records], [r["phash"] for r in records], max_distance=phash_distance)
    for rec, group in zip(records, groups):
        rec["group"] = group

    _assign_splits(records, layout, groups, seed, valid_fraction, test_fraction)

    report = _report(records, quarantined, layout, ignored_classes, classes, str(root), source_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).write_text(json.dumps({"classes": list(classes), "fingerprint": report["fingerprint"],
                                                "records": records}, indent=1))
    return report


def _assign_splits(records: list[dict], layout: str, groups: list[int], seed: int,
                   valid_fraction: float, test_fraction: float) -> None:
    labels = [r["label"] for r in records]
    given = {r["source_split"] for r in records}
    by_source = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r["source_split"]].append(i)
        r["split"] = r["source_split"]
    if layout == "flat":
        rest, test = _carve(by_source["all"], labels, groups, test_fraction, seed, "test")
        train, valid = _carve(rest, labels, groups, valid_fraction, seed + 1, "valid")
        roles = {"test": test, "valid": valid, "train": train}
    elif given == {"train", "valid", "test"}:
        return
    elif "test" not in given and "valid" in given:
        # The given valid split becomes the untouched evaluation set; early stopping
        # gets its own slice of train so that evaluation stays honest.
        train, valid = _carve(by_source["train"], labels, groups, valid_fraction, seed, "valid")
        roles = {"test": by_source["valid"], "valid": valid, "train": train}
    elif "test" in given and "valid" not in given:
        train, valid = _carve(by_source["train"], labels, groups, valid_fraction, seed, "valid")
        roles = {"test": by_source["test"], "valid": valid, "train": train}
    else:  # train only
        rest, test = _carve(by_source["train"], labels, groups, test_fraction, seed, "test")
        train, valid = _carve(rest, labels, groups, valid_fraction, seed + 1, "valid")
        roles = {"test": test, "valid": valid, "train": train}
    for role, indices in roles.items():
        for i in indices:
            records[i]["split"] = role


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _report(records: list[dict], quarantined: list[dict], layout: str, ignored_classes: list[str],
            classes: tuple[str, ...], root: str, source_uri: str) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "valid", "test"):
        c = Counter(r["label"] for r in records if r["split"] == split)
        counts[split] = {label: c.get(label, 0) for label in classes}
    members = defaultdict(list)
    for r in records:
        members[r["group"]].append(r)
    duplicate_groups, leaks, conflicts = [], [], []
    for gid, recs in sorted(members.items()):
        if len(recs) < 2:
            continue
        entry = {
            "group": gid,
            "kind": "exact" if len({r["sha256"] for r in recs}) == 1 else "near",
            "members": [{"path": r["path"], "source_split": r["source_split"], "split": r["split"],
                         "label": r["label"]} for r in recs],
        }
        duplicate_groups.append(entry)
        if len({r["source_split"] for r in recs}) > 1:
            leaks.append(entry)
        if len({r["label"] for r in recs}) > 1:
            conflicts.append(entry)
    return {
        "source_uri": source_uri,
        "dataset_root": root,
        "layout": layout,
        "classes": list(classes),
        "ignored_classes": ignored_classes,
        "fingerprint": fingerprint(records),
        "images": len(records),
        "distinct_pictures": len(members),
        "counts": counts,
        "split_roles": {"train": "fitted on", "valid": "early stopping", "test": "evaluation only"},
        "quarantined": quarantined,
        "duplicate_groups": duplicate_groups,
        "leaks": leaks,
        "label_conflicts": conflicts,
    }


def report_markdown(report: dict) -> str:
    """A short summary for the KFP UI; the JSON report has the full lists."""
    lines = [
        f"# Dataset validation: {report['source_uri'] or report['dataset_root']}",
        "",
        f"Layout **{report['layout']}**, {report['images']} usable images, "
        f"{report['distinct_pictures']} distinct pictures, fingerprint `{report['fingerprint'][:16]}`.",
        "",
        "| split | " + " | ".join(report["classes"]) + " |",
        "|---|" + "---:|" * len(report["classes"]),
    ]
    for split, c in report["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(c[k]) for k in report["classes"]) + " |")
    lines += ["", f"**Quarantined: {len(report['quarantined'])}**"]
    lines += [f"- `{q['path']}`: {q['reason']}" for q in report["quarantined"][:50]]
    lines += ["", f"**Duplicate groups: {len(report['duplicate_groups'])}**, "
              f"**leaks across given splits: {len(report['leaks'])}**, "
              f"**label conflicts: {len(report['label_conflicts'])}**"]
    for leak in report["leaks"][:50]:
        lines.append("- leak: " + ", ".join(f"`{m['source_split']}/{Path(m['path']).name}`" for m in leak["members"]))
    if report["ignored_classes"]:
        lines += ["", f"Ignored class folders: {', '.join(report['ignored_classes'])}"]
    return "\n".join(lines) + "\n"


def load_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{dataset_dir}: no {MANIFEST}; expected the output folder of the ingest step")
    return json.loads(path.read_text())


def split_files(dataset_dir: Path, split: str) -> tuple[list[str], list[int]]:
    """Absolute file paths and 0/1 labels (1 = positive class) of one split."""
    manifest = load_manifest(dataset_dir)
    classes = manifest["classes"]
    recs = [r for r in manifest["records"] if r["split"] == split]
    if not recs:
        raise DatasetError(f"{dataset_dir}: split {split!r} is empty")
    return [str(Path(dataset_dir) / r["file"]) for r in recs], [classes.index(r["label"]) for r in recs]
