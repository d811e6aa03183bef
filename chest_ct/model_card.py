"""The model card that ends the evaluation report: what the model is for, what it learnt from, where it came from.

The text that does not depend on the run (intended use, what it is not for, the
known limits of the data) is written here once; the README's section "What the
data can and cannot show" is :data:`DATA_LIMITATIONS` word for word (a test
keeps them equal), since the training image carries the package, not the README.

The source commit: the training image is built with ``--build-arg
GIT_COMMIT=$(git rev-parse HEAD)`` (``Dockerfile.train`` sets
``CHEST_CT_GIT_COMMIT`` from it); a local run asks git; otherwise it is "unknown".
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chest_ct.html_parts import e, items, table
from chest_ct.records import ROLES, Manifest

log = logging.getLogger(__name__)

COMMIT_ENV = "CHEST_CT_GIT_COMMIT"
UNKNOWN = "unknown"

INTENDED_USE = (
    (
        "Research and engineering: a test bed for training, evaluating and serving a CT image classifier "
        "on Kubeflow, MLflow and KServe."
    ),
    (
        "Scores one chest CT image (PNG/JPEG screenshot) for adenocarcinoma versus normal; the output is a "
        "probability and a label at the threshold stored with the model."
    ),
    (
        "The Grad-CAM map shows which regions raised the adenocarcinoma score, to help a person judge whether "
        "the model looked at the lung or at something else."
    ),
)
NOT_FOR = (
    "Not a medical device: not for diagnosis, screening, triage or any decision about a patient.",
    (
        "Not for other findings or cancer types (large cell or squamous cell carcinoma, nodules, infection): "
        "it knows two classes only and gives every image one of them."
    ),
    (
        "Not for images unlike its training data (other scanners, windows, resolutions, DICOM series, non-chest "
        "slices): it has no way to say it does not know."
    ),
    (
        "Not a proof of pathology detection: a high score can come from how the images were collected (see the "
        "shortcut audit)."
    ),
)
GENERAL_LIMITATIONS = (
    "One 2-D slice at a time, resized to a square: no 3-D context, no patient history, aspect ratio lost.",
    (
        "The threshold targets a sensitivity on out-of-fold predictions of the fitting data; on new data the "
        "sensitivity it reaches can differ."
    ),
    "Grad-CAM maps are coarse (VGG16's last conv grid) and show correlation with the score, not causation.",
)
#: README, section "What the data can and cannot show", word for word.
DATA_LIMITATIONS = (
    "The shared data (`../shared/data/chest-ct`, see its README) is small and biased: train/normal has "
    "60 files but only 8 distinct pictures, the two classes come from different sources and sizes "
    "(adenocarcinoma: small CT screenshots; normal: larger web images), some normal images carry drawn "
    "marks, and a few duplicates cross train and valid (ingest reports both known leaks and keeps "
    "them out of the score, which leaves 3 normal and 7 adenocarcinoma test pictures). Image "
    "statistics alone separate the classes almost perfectly here, so the shortcut audit fires on it. A "
    "high AUC on this data says little about pathology; treat it as a pipeline test bed."
)


def source_commit() -> str:
    """The git commit of the running code: the image's build argument, else git, else "unknown"."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given and given != UNKNOWN:
        return given
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{commit} (with uncommitted changes)" if dirty else commit or UNKNOWN


@dataclass(frozen=True)
class DataRow:
    """Images and distinct pictures (duplicate groups) of one role and class."""

    role: str
    label: str
    images: int
    pictures: int


@dataclass
class ModelCard:
    model_name: str
    registered_version: str
    mlflow_run_id: str
    experiment: str
    tracking_uri: str
    git_commit: str
    dataset_fingerprint: str
    base_weights: str
    image_size: int
    threshold: float
    threshold_source: str
    exported_at: str
    data: list[DataRow]
    training: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)


def random_base(base_weights: str) -> bool:
    """Whether the pipeline's ``base_weights`` left VGG16 untrained (``none``)."""
    return base_weights.strip().lower() in {"none", "random", ""}


def data_summary(manifest: Manifest) -> list[DataRow]:
    images = Counter((r.split, r.label) for r in manifest.records)
    pictures = Counter((split, label) for split, label, _ in {(r.split, r.label, r.group) for r in manifest.records})
    return [
        DataRow(role, label, images[role, label], pictures[role, label])
        for role in ROLES
        for label in manifest.classes
        if images[role, label]
    ]


def findings(manifest: Manifest, report: dict[str, Any], base_weights: str) -> list[str]:
    """What this run measured that limits how far its numbers can be trusted."""
    out = []
    groups = report.get("groups_per_class", {})
    if groups:
        out.append(
            f"The score rests on {report['scored_images']} test images, "
            + ", ".join(f"{n} distinct {label} pictures" for label, n in groups.items())
            + ": read the intervals, not the point values."
        )
    for row in data_summary(manifest):
        if row.role == "train" and row.images >= 3 * row.pictures:
            out.append(
                f"Training {row.label} images are mostly copies: {row.images} files, {row.pictures} distinct pictures."
            )
    audit = report.get("shortcut", {})
    if audit.get("warning"):
        out.append(
            f"Shortcut warning: image statistics alone reach AUC {audit['statistics_auc']:.3f} against the "
            f"model's {audit['model_auc']:.3f}; the score may reflect image source, not pathology."
        )
    if report.get("excluded_images"):
        n = report["excluded_images"]
        out.append(
            f"{n} image{'s were' if n != 1 else ' was'} kept out of the score (copies of pictures the model "
            "saw, or label conflicts), listed in the report."
        )
    if random_base(base_weights):
        out.append(
            "The VGG16 base has random weights (base_weights=none), not ImageNet's: it has learnt nothing, "
            "so its features and Grad-CAM maps say little; use this model to test the pipeline only."
        )
    return out


def build_model_card(
    manifest: Manifest,
    metadata: dict[str, Any],
    report: dict[str, Any],
    *,
    run_id: str,
    registered_version: str,
    model_name: str,
    experiment: str,
    base_weights: str,
    git_commit: str | None = None,
) -> ModelCard:
    import mlflow

    params: dict[str, str] = {}
    try:
        params = dict(mlflow.get_run(run_id).data.params)
    except Exception as exc:  # the card is still worth having without the run's parameters
        log.warning("model card: cannot read the parameters of MLflow run %s: %s", run_id, exc)
    return ModelCard(
        model_name=model_name,
        registered_version=registered_version,
        mlflow_run_id=run_id,
        experiment=experiment,
        tracking_uri=mlflow.get_tracking_uri(),
        git_commit=git_commit or source_commit(),
        dataset_fingerprint=manifest.fingerprint,
        base_weights=base_weights or UNKNOWN,
        image_size=int(metadata["image_size"]),
        threshold=float(metadata["threshold"]),
        threshold_source=metadata.get("threshold_source", ""),
        exported_at=metadata.get("exported_at", ""),
        data=data_summary(manifest),
        training=dict(metadata.get("training", {})),
        params=params,
        findings=findings(manifest, report, base_weights),
    )


def card_html(k: ModelCard) -> str:
    """The card as the last section of the HTML report."""
    provenance = [
        ["registered model", f"{e(k.model_name)} version {e(k.registered_version)}"],
        ["MLflow run", f"<code>{e(k.mlflow_run_id)}</code> in experiment {e(k.experiment)}"],
        ["MLflow tracking", f"<code>{e(k.tracking_uri)}</code>"],
        ["git commit", f"<code>{e(k.git_commit)}</code>"],
        ["dataset fingerprint", f"<code>{e(k.dataset_fingerprint)}</code>"],
        [
            "model",
            (
                f"VGG16 base (weights: {e(k.base_weights)}), sigmoid head; input {k.image_size} px; "
                f"exported {e(k.exported_at)}"
            ),
        ],
        [
            "training",
            e(
                ", ".join(
                    f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in sorted(k.training.items())
                )
            ),
        ],
        ["threshold", f"{k.threshold:.4f}"],
    ]
    params = [[e(name), e(value)] for name, value in sorted(k.params.items())]
    data = [[e(row.role), e(row.label), row.images, row.pictures] for row in k.data]
    return (
        "<h3>Intended use</h3>"
        + items(INTENDED_USE)
        + "<h3>Not for</h3>"
        + items(NOT_FOR)
        + "<h3>Training data</h3>"
        + table(["role", "class", "images", "distinct pictures"], data)
        + "<h3>Known limitations</h3>"
        + items(GENERAL_LIMITATIONS)
        + "<p><b>The data</b> (README, “What the data can and cannot show”): "
        + e(DATA_LIMITATIONS).replace("`", "")
        + "</p>"
        + ("<p><b>Measured in this run:</b></p>" + items(k.findings) if k.findings else "")
        + "<h3>Provenance</h3>"
        + table([], provenance)
        + (
            "<details><summary>Training parameters (MLflow run)</summary>"
            + table(["name", "value"], params)
            + "</details>"
            if params
            else ""
        )
    )
