"""The ingest step's validation report: where every file went, duplicates, leaks, exclusions.

The JSON report has the full lists; :func:`report_markdown` is the summary the
KFP UI shows. ``files`` adds up: found = images + quarantined + ignored.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chest_ct.layout import Scan
from chest_ct.records import EXCLUDED, ROLE_MEANING, ROLES, ImageRecord, Manifest


@dataclass(frozen=True)
class QuarantinedFile:
    path: str
    given_split: str
    label: str
    reason: str


def _member(r: ImageRecord) -> dict[str, Any]:
    return {"path": r.path, "given_split": r.given_split, "split": r.split, "label": r.label}


def duplicate_groups(records: list[ImageRecord]) -> list[dict[str, Any]]:
    """Groups of two or more files, with their kind (exact: same bytes; near: similar pixels)."""
    members: dict[int, list[ImageRecord]] = defaultdict(list)
    for r in records:
        members[r.group].append(r)
    out = []
    for gid, recs in sorted(members.items()):
        if len(recs) > 1:
            out.append(
                {
                    "group": gid,
                    "kind": "exact" if len({r.sha256 for r in recs}) == 1 else "near",
                    "members": [_member(r) for r in recs],
                }
            )
    return out


def build_report(
    manifest: Manifest,
    found: Scan,
    quarantined: list[QuarantinedFile],
    *,
    source_uri: str,
    seed: int,
    valid_fraction: float,
    test_fraction: float,
    refused: list[dict[str, Any]] | None = None,
    largest_groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON report. ``refused``: source objects the fetch would not download (never files under the root,
    so outside the file count); ``largest_groups``: the biggest duplicate groups (chain-grouping check)."""
    records, classes = manifest.records, list(manifest.classes)
    files = {
        "found": found.files_found,
        "images": len(records),
        "quarantined": len(quarantined),
        "ignored": len(found.ignored),
    }
    if files["found"] != files["images"] + files["quarantined"] + files["ignored"]:
        raise RuntimeError(f"file accounting does not add up: {files}")  # a bug, never a data problem
    counts, pictures = {}, {}
    for role in ROLES:
        in_role = [r for r in records if r.split == role]
        c = Counter(r.label for r in in_role)
        counts[role] = {label: c.get(label, 0) for label in classes}
        g = Counter(label for label, _ in {(r.label, r.group) for r in in_role})
        pictures[role] = {label: g.get(label, 0) for label in classes}
    total_groups = len({r.group for r in records})
    groups = duplicate_groups(records)
    return {
        "source_uri": source_uri,
        "dataset_root": str(found.dataset_root),
        "layout": found.layout,
        "classes": classes,
        "fingerprint": manifest.fingerprint,
        "files": files,
        "images": len(records),
        "distinct_pictures": total_groups,
        "counts": counts,
        "pictures": pictures,
        "split_roles": ROLE_MEANING,
        "split_settings": {
            "seed": seed,
            "valid_fraction": valid_fraction,
            "test_fraction": test_fraction,
            "unit": "duplicate groups of the whole dataset, per class",
        },
        "quarantined": [asdict(q) for q in quarantined],
        "ignored": [asdict(i) for i in found.ignored],
        "ignored_classes": found.ignored_classes,
        "refused_source_objects": refused or [],
        "duplicate_groups": groups,
        "largest_duplicate_groups": largest_groups or [],
        "leaks": [g for g in groups if len({m["given_split"] for m in g["members"]}) > 1],
        "label_conflicts": [g for g in groups if len({m["label"] for m in g["members"]}) > 1],
        "excluded": [{**_member(r), "group": r.group, "reason": r.exclusion} for r in records if r.split == EXCLUDED],
    }


def report_markdown(report: dict[str, Any], max_items: int = 50) -> str:
    """A short summary for the KFP UI; the JSON report has the full lists."""
    f, classes = report["files"], report["classes"]
    lines = [
        f"# Dataset validation: {report['source_uri'] or report['dataset_root']}",
        "",
        f"Layout **{report['layout']}**, fingerprint `{report['fingerprint'][:16]}`. "
        f"**{f['found']} files** found: {f['images']} images used, {f['quarantined']} quarantined, "
        f"{f['ignored']} ignored. {report['distinct_pictures']} distinct pictures.",
        "",
        "| role | " + " | ".join(f"{c} (pictures)" for c in classes) + " | meaning |",
        "|---|" + "---:|" * len(classes) + "---|",
    ]
    for role, c in report["counts"].items():
        cells = " | ".join(f"{c[k]} ({report['pictures'][role][k]})" for k in classes)
        lines.append(f"| {role} | {cells} | {report['split_roles'][role]} |")
    sections = [
        ("Quarantined", report["quarantined"], lambda q: f"`{q['path']}`: {q['reason']}"),
        ("Ignored", report["ignored"], lambda i: f"`{i['path']}`: {i['reason']}"),
        (
            "Refused by the fetch (not downloaded)",
            report["refused_source_objects"],
            lambda r: f"`{r['key']}`: {r['reason']}",
        ),
        ("Excluded from training and scoring", report["excluded"], lambda e: f"`{e['path']}`: {e['reason']}"),
        (
            "Leaks across given splits",
            report["leaks"],
            lambda g: ", ".join(f"`{m['given_split']}/{Path(m['path']).name}`" for m in g["members"]),
        ),
        (
            "Label conflicts",
            report["label_conflicts"],
            lambda g: ", ".join(f"`{m['path']}` ({m['label']})" for m in g["members"]),
        ),
    ]
    for title, items, fmt in sections:
        lines += ["", f"**{title}: {len(items)}**"]
        lines += [f"- {fmt(item)}" for item in items[:max_items]]
        if len(items) > max_items:
            lines.append(f"- ... {len(items) - max_items} more in the JSON report")
    lines += ["", f"Duplicate groups (2+ files): {len(report['duplicate_groups'])}"]
    if report["ignored_classes"]:
        lines.append(f"Ignored class folders: {', '.join(report['ignored_classes'])}")
    return "\n".join(lines) + "\n"
