"""The pipeline's evaluate step: score, decide, publish.

1. **Score** (:mod:`chest_ct.scoring`): the exported model on the test images it
   never saw (ingest already excluded copies of fitted pictures; the model's own
   record of its fitted images is checked again), per image and per picture, at
   the threshold the train step chose out-of-fold.
2. **Decide** (:mod:`chest_ct.blessing`): per-group floors, and the champion
   compared on test pictures neither model saw.
3. **Publish** (:mod:`chest_ct.publishing`): MLflow, the registry, the champion alias.
4. **Report** (:mod:`chest_ct.report_html`): one self-contained HTML page with the
   curves, intervals, shortcut audit, a Grad-CAM gallery from the exported model
   and the model card, for the Kubeflow UI and MLflow.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chest_ct import defaults, registry
from chest_ct.blessing import BlessingPolicy, Decision, decide
from chest_ct.export import read_metadata, write_metadata
from chest_ct.gallery import build_gallery
from chest_ct.guard_eval import guard_markdown, guard_rates, log_guard_rates
from chest_ct.metrics import bootstrap_intervals, calibration, roc_points
from chest_ct.model_card import build_model_card, source_commit
from chest_ct.plots import CALIBRATION_BINS, save_plots
from chest_ct.precision import precision_agreement
from chest_ct.publishing import log_report_html, publish
from chest_ct.records import EXCLUDED, TEST, TRAIN, ImageRecord, Manifest
from chest_ct.report_html import ReportContent, write_report
from chest_ct.scoring import Comparison, Scores, compare_with_champion, score_model, scored_test_set
from chest_ct.shortcut import shortcut_audit

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    scores: Scores
    decision: Decision
    model_version: str
    report: dict[str, Any]
    plots: dict[str, str]
    report_html: str = ""

    @property
    def blessed(self) -> bool:
        return self.decision.blessed

    @property
    def reasons(self) -> list[str]:
        return self.decision.reasons

    def roc(self) -> list[tuple[float, float, float]]:
        """Per-picture ROC points (what the blessing uses)."""
        return roc_points(*self.scores.group_level())

    def confusion(self) -> list[list[int]]:
        m = self.scores.per_group
        return [[int(m["tn"]), int(m["fp"])], [int(m["fn"]), int(m["tp"])]]


def evaluate_model(
    model_dir: Path,
    dataset_dir: Path,
    out_model_dir: Path,
    plots_dir: Path,
    *,
    run_id: str,
    policy: BlessingPolicy | None = None,
    registered_model_name: str = defaults.REGISTERED_MODEL,
    experiment: str = defaults.EXPERIMENT,
    report_html: Path | None = None,
    base_weights: str = "",
) -> Evaluation:
    """Score, decide and publish; with ``report_html``, also write the HTML report there and log it to MLflow.

    ``base_weights`` (the pipeline parameter) is only shown in the model card.
    """
    policy = policy or BlessingPolicy()
    manifest = Manifest.load(dataset_dir)
    metadata = read_metadata(model_dir)
    threshold = float(metadata["threshold"])

    scored, seen_here = scored_test_set(model_dir, manifest, manifest.role(TEST))
    scores = score_model(model_dir, manifest, scored, threshold)
    excluded = [
        {"path": r.path, "given_split": r.given_split, "label": r.label, "reason": r.exclusion}
        for r in manifest.role(EXCLUDED)
    ]
    excluded += [
        {
            "path": r.path,
            "given_split": r.given_split,
            "label": r.label,
            "reason": f"{seen_here[r.path]} (this model's record)",
        }
        for r in manifest.role(TEST)
        if r.path in seen_here
    ]
    audit = shortcut_audit(manifest.role(TRAIN), scored, metadata["positive_class"], scores.per_image["roc_auc"])
    plots = save_plots(
        {"per_group": scores.group_level(), "per_image": (scores.y, scores.prob)},
        threshold,
        metadata["class_names"],
        plots_dir,
    )

    # The evaluated model is the trained one plus what evaluation found.
    if Path(out_model_dir).exists():
        shutil.rmtree(out_model_dir)
    shutil.copytree(model_dir, out_model_dir)
    commit = source_commit()
    guard = guard_rates(model_dir, [manifest.file(r) for r in scored])
    evaluation = {
        "per_image": scores.per_image,
        "per_group": scores.per_group,
        "scored_images": scores.images,
        "scored_groups": sum(scores.groups_per_class.values()),
        "excluded_images": len(excluded),
        "guard": guard.to_dict(),
        "git_commit": commit,
    }
    # How a bf16 server's answers differ from these float32 ones on the same split (chest_ct.precision).
    evaluation["precision_agreement"] = precision_agreement(model_dir, [manifest.file(r) for r in scored], threshold)
    write_metadata(out_model_dir, {**metadata, "mlflow_run_id": run_id, "evaluation": evaluation})

    registry.use_tracking(experiment)
    current = registry.champion(registered_model_name)
    comparison = _compare(current, out_model_dir, scores, scored, manifest)
    decision = decide(scores.per_group, policy, comparison)
    report: dict[str, Any] = {
        **evaluation,
        "groups_per_class": scores.groups_per_class,
        "threshold": threshold,
        "threshold_source": metadata.get("threshold_source", ""),
        "excluded": excluded,
        "champion": comparison.summary() if comparison else None,
        "shortcut": audit,
        "decision": {"blessed": decision.blessed, "reasons": decision.reasons, "policy": policy.to_dict()},
    }
    # Everything the HTML report computes (and could fail on) is done before the registry is touched.
    content = (
        _report_content(report, scores, plots, Path(out_model_dir), manifest, scored, metadata, run_id)
        if report_html
        else None
    )
    version = publish(
        run_id,
        Path(out_model_dir),
        report,
        plots,
        decision,
        registered_model_name=registered_model_name,
        expected_champion=current[0] if current else None,
    )
    log_guard_rates(run_id, guard)
    log.info("evaluation: %s", "blessed" if decision.blessed else "not blessed: " + "; ".join(decision.reasons))
    if content is not None and report_html is not None:
        card = build_model_card(
            manifest,
            metadata,
            report,
            run_id=run_id,
            registered_version=version,
            model_name=registered_model_name,
            experiment=experiment,
            base_weights=base_weights,
            git_commit=commit,
        )
        log_report_html(run_id, write_report(content, card, Path(report_html)))
    return Evaluation(
        scores=scores,
        decision=decision,
        model_version=version,
        report=report,
        plots={k: str(v) for k, v in plots.items()},
        report_html=str(report_html or ""),
    )


def _report_content(
    report: dict[str, Any],
    scores: Scores,
    plots: dict[str, Path],
    model_dir: Path,
    manifest: Manifest,
    scored: list[ImageRecord],
    metadata: dict[str, Any],
    run_id: str,
) -> ReportContent:
    """Intervals, calibration and the Grad-CAM gallery (through the exported explain signature) for the report."""
    yg, pg = scores.group_level()
    return ReportContent(
        report=report,
        plots=plots,
        class_names=manifest.classes,
        intervals={
            "per_group": bootstrap_intervals(yg, pg, scores.threshold),
            "per_image": bootstrap_intervals(scores.y, scores.prob, scores.threshold, groups=scores.groups),
        },
        calibration={
            "per_group": calibration(yg, pg, CALIBRATION_BINS),
            "per_image": calibration(scores.y, scores.prob, CALIBRATION_BINS),
        },
        gallery=build_gallery(
            model_dir,
            [manifest.file(r) for r in scored],
            [r.path for r in scored],
            scores.y,
            scores.prob,
            scores.groups,
            scores.threshold,
            manifest.classes,
        ),
        threshold_choice=_threshold_choice(run_id),
        heatmap_grid=metadata.get("heatmap", {}).get("grid", ()),
    )


def _threshold_choice(run_id: str) -> dict[str, Any]:
    """The train step's record of how it chose the threshold (folds, calibration); empty if the run lacks it."""
    import mlflow

    try:
        return dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/training/threshold.json"))
    except Exception as exc:  # older runs, or runs made outside the train step: the report says less
        log.info("no training/threshold.json in run %s (%s)", run_id, exc)
        return {}


def _compare(
    current: tuple[str, str] | None, challenger_dir: Path, scores: Scores, scored: list[Any], manifest: Manifest
) -> Comparison | None:
    """The champion on the pictures neither model saw; a champion that cannot be scored blocks promotion."""
    if current is None:
        return None
    version, source = current
    with tempfile.TemporaryDirectory() as tmp:
        try:
            champion_dir = registry.download(source, Path(tmp))
            return compare_with_champion(version, champion_dir, scores, scored, manifest)
        except Exception as exc:  # a broken champion must not break evaluation, nor be replaced unchecked
            return Comparison(version, error=f"cannot score champion version {version} ({source}): {exc}")


def summary_markdown(result: Evaluation) -> str:
    """Markdown for the KFP UI."""
    r, s = result.report, result.scores

    def row(unit: str, m: dict[str, float]) -> str:
        counts = "/".join(f"{m[k]:.0f}" for k in ("tp", "fp", "tn", "fn"))
        return (
            f"| {unit} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['roc_auc']:.3f} | "
            f"{m['precision']:.3f} | {m['accuracy']:.3f} | {counts} |"
        )

    lines = [
        "# chest-ct evaluation",
        "",
        f"**{'BLESSED (champion)' if result.blessed else 'NOT BLESSED'}**, registered version {result.model_version}",
        *[f"- {reason}" for reason in result.reasons],
        "",
        f"Scored **{r['scored_images']} test images ({r['scored_groups']} duplicate groups: "
        + ", ".join(f"{n} {c}" for c, n in s.groups_per_class.items())
        + f")** at threshold {s.threshold:.4f} "
        f"({r['threshold_source'] or 'source unknown'}). Blessing uses the per-group row.",
        "",
        "| unit | sensitivity | specificity | ROC AUC | precision | accuracy | tp/fp/tn/fn |",
        "|---|---:|---:|---:|---:|---:|---|",
        row("per group", s.per_group),
        row("per image", s.per_image),
        "",
        f"**Excluded from the score: {r['excluded_images']}**",
        *[f"- `{e['path']}`: {e['reason']}" for e in r["excluded"][:50]],
        "",
        ("## " if r["shortcut"]["warning"] else "") + r["shortcut"]["message"],
        "",
        "Single-statistic AUCs: " + json.dumps(r["shortcut"]["single_feature_auc"]),
        "",
        *guard_markdown(r["guard"]),
    ]
    return "\n".join(lines) + "\n"
