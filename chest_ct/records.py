"""The dataset artifact's records: one typed record per image, and the manifest that holds them.

Output folder of the ingest step (the KFP Dataset artifact)::

    manifest.json        classes, fingerprint and one ImageRecord per usable image
    images/<path>        the usable images, at their path relative to the fetched root
    quarantine/<path>    files that failed validation (listed in the report with reasons)

A record's ``split`` is its role: ``train`` is fitted on, ``valid`` drives early
stopping (and, with ``train``, the out-of-fold threshold), ``test`` is only ever
scored, ``excluded`` is kept out of all of them (``exclusion`` says why).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chest_ct.images import ImageInfo

MANIFEST_FILE = "manifest.json"
IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
FORMAT_VERSION = 2

TRAIN, VALID, TEST, EXCLUDED = "train", "valid", "test", "excluded"
#: Roles the model sees: a test picture that shares a duplicate group with one of them is excluded.
FITTING_ROLES = (TRAIN, VALID)
ROLES = (TRAIN, VALID, TEST, EXCLUDED)
ROLE_MEANING = {
    TRAIN: "fitted on",
    VALID: "early stopping; with train, the out-of-fold threshold",
    TEST: "scored only",
    EXCLUDED: "kept out of training and scoring (copy of a fitted picture, or a label conflict)",
}


class DatasetError(ValueError):
    """The dataset's layout or content cannot be trained on; the message says what was expected."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image of the dataset.

    ``path`` is relative to the fetched dataset root (POSIX), as the file was found;
    its copy in the artifact is ``images/<path>``. ``given_split`` is the split folder
    it was found in (``all`` in a flat layout); ``split`` is the role the pipeline gave it.
    """

    path: str
    given_split: str
    label: str
    image: ImageInfo
    group: int = -1
    split: str = ""
    exclusion: str = ""

    @property
    def sha256(self) -> str:
        return self.image.sha256

    @property
    def phash(self) -> str:
        return self.image.phash

    @property
    def stored_as(self) -> str:
        """Path of the copy inside the dataset artifact."""
        return f"{IMAGES_DIR}/{self.path}"

    def with_role(self, split: str, exclusion: str = "") -> ImageRecord:
        return replace(self, split=split, exclusion=exclusion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        return cls(**{**data, "image": ImageInfo(**data["image"])})


def fingerprint(records: Iterable[ImageRecord]) -> str:
    """Content hash of the dataset as the pipeline uses it (role, label, bytes of every image)."""
    lines = sorted(f"{r.split}\t{r.label}\t{r.sha256}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class Manifest:
    """The records of one ingested dataset; ``root`` is the artifact folder it was read from."""

    classes: tuple[str, ...]
    records: list[ImageRecord]
    fingerprint: str = ""
    root: Path = field(default=Path("."), compare=False)

    def role(self, split: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == split]

    def label_index(self, record: ImageRecord) -> int:
        """0/1 target of a record: its class's index (index 1 is the positive class)."""
        return self.classes.index(record.label)

    def file(self, record: ImageRecord) -> str:
        return str(self.root / record.stored_as)

    def files_and_labels(self, split: str) -> tuple[list[str], list[int]]:
        """Absolute file paths and 0/1 labels of one role, in manifest order."""
        recs = self.role(split)
        if not recs:
            raise DatasetError(f"{self.root}: split {split!r} is empty")
        return [self.file(r) for r in recs], [self.label_index(r) for r in recs]

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "fingerprint": self.fingerprint,
            "records": [r.to_dict() for r in self.records],
        }
        with (out_dir / MANIFEST_FILE).open("w") as fh:  # streamed: no second copy of a million records
            json.dump(data, fh, indent=1)

    @classmethod
    def load(cls, dataset_dir: Path) -> Manifest:
        path = Path(dataset_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DatasetError(f"{dataset_dir}: no {MANIFEST_FILE}; expected the output folder of the ingest step")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}; "
                "re-run the ingest step with this version of chest-ct"
            )
        return cls(
            classes=tuple(data["classes"]),
            fingerprint=data["fingerprint"],
            records=[ImageRecord.from_dict(r) for r in data["records"]],
            root=Path(dataset_dir),
        )
