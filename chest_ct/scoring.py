"""Score exported models on test images they never saw, per image and per picture.

Predictions come from the exported SavedModel's bytes signature, the exact graph
the server runs, streamed from the image files batch by batch. Per picture, each
duplicate group counts once with its mean probability: copies of one picture are
one piece of evidence, and the blessing floors use these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chest_ct.export import read_metadata
from chest_ct.metrics import by_group, classification_metrics
from chest_ct.predict import predict_files
from chest_ct.records import ImageRecord, Manifest
from chest_ct.seen_images import SeenImage, read_seen, split_unseen


@dataclass
class Scores:
    """Metrics of one model on one set of test images, at one threshold."""

    threshold: float
    images: int
    groups_per_class: dict[str, int]
    per_image: dict[str, float]
    per_group: dict[str, float]
    y: np.ndarray = field(repr=False)
    prob: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)

    def group_level(self) -> tuple[np.ndarray, np.ndarray]:
        yg, pg, _ = by_group(self.y, self.prob, self.groups)
        return yg, pg

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "images": self.images,
            "groups_per_class": self.groups_per_class,
            "per_image": self.per_image,
            "per_group": self.per_group,
        }


def scores_from_predictions(
    y: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float, class_names: tuple[str, ...]
) -> Scores:
    yg, pg, _ = by_group(y, prob, groups)
    return Scores(
        threshold=threshold,
        images=len(y),
        groups_per_class={class_names[c]: int((yg == c).sum()) for c in (0, 1)},
        per_image=classification_metrics(y, prob, threshold),
        per_group=classification_metrics(yg, pg, threshold),
        y=y,
        prob=prob,
        groups=groups,
    )


def score_model(model_dir: Path, manifest: Manifest, records: list[ImageRecord], threshold: float) -> Scores:
    """Predict ``records`` with the SavedModel in ``model_dir`` and score them at ``threshold``."""
    y = np.array([manifest.label_index(r) for r in records], dtype=int)
    if len(set(y.tolist())) < 2:
        raise ValueError(
            f"{manifest.root}: the test images left to score hold only "
            f"{sorted({r.label for r in records})}; both classes are needed to evaluate"
        )
    prob = predict_files(model_dir, [manifest.file(r) for r in records])
    return scores_from_predictions(y, prob, np.array([r.group for r in records]), threshold, manifest.classes)


@dataclass
class Comparison:
    """Challenger and champion on the test pictures neither has seen (per picture ROC AUC)."""

    champion_version: str
    images: int = 0
    groups_per_class: dict[str, int] = field(default_factory=dict)
    challenger_auc: float = float("nan")
    champion_auc: float = float("nan")
    excluded_as_seen_by_champion: dict[str, str] = field(default_factory=dict)
    unavailable: str = ""  # why the comparison could not be made (no record of the champion's images)
    error: str = ""  # the champion could not be scored: blocks promotion

    def conclusive(self, min_per_class: int) -> bool:
        if self.error or self.unavailable or not self.groups_per_class:
            return False
        return min(self.groups_per_class.values()) >= min_per_class

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def compare_with_champion(
    version: str, champion_dir: Path, challenger: Scores, scored: list[ImageRecord], manifest: Manifest
) -> Comparison:
    """Score the champion on the challenger's scored images that the champion never saw either."""
    seen: list[SeenImage] | None = read_seen(champion_dir)
    if seen is None:
        return Comparison(
            version,
            unavailable=f"champion version {version} carries no record of the images it "
            "was trained on, so no fair comparison set can be formed",
        )
    common, excluded = split_unseen(scored, seen)
    comparison = Comparison(version, images=len(common), excluded_as_seen_by_champion=excluded)
    keep = np.isin([r.path for r in scored], [r.path for r in common])
    y, g = challenger.y[keep], challenger.groups[keep]
    yg, _, _ = by_group(y, challenger.prob[keep], g) if len(y) else (np.array([], int), None, None)
    comparison.groups_per_class = {manifest.classes[c]: int((yg == c).sum()) for c in (0, 1)}
    if min(comparison.groups_per_class.values()) == 0:
        return comparison
    threshold = float(read_metadata(champion_dir)["threshold"])
    champ = scores_from_predictions(
        y, predict_files(champion_dir, [manifest.file(r) for r in common]), g, threshold, manifest.classes
    )
    mine = scores_from_predictions(y, challenger.prob[keep], g, challenger.threshold, manifest.classes)
    comparison.challenger_auc, comparison.champion_auc = mine.per_group["roc_auc"], champ.per_group["roc_auc"]
    return comparison


def scored_test_set(
    model_dir: Path, manifest: Manifest, test: list[ImageRecord]
) -> tuple[list[ImageRecord], dict[str, str]]:
    """The test records the model never saw (checked against its own record), and why others were left out."""
    seen = read_seen(model_dir)
    if seen is None:
        raise ValueError(
            f"{model_dir}: no record of the images this model was fitted on; "
            "expected a model exported by this version's train step"
        )
    return split_unseen(test, seen)
