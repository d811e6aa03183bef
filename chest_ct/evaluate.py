"""The pipeline's evaluate step: score, decide, publish.

1. **Score** (:mod:`chest_ct.scoring`): the exported model on the test images it
   never saw (ingest already excluded copies of fitted pictures; the model's own
   record of its fitted images is checked again), per image and per picture, at
   the threshold the train step chose out-of-fold.
2. **Decide** (:mod:`chest_ct.blessing`): per-group floors, and the champion
   compared on test pictures neither model saw.
3. **Publish** (:mod:`chest_ct.publishing`): MLflow, the registry, the champion alias.
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
from chest_ct.metrics import roc_points
from chest_ct.plots import save_plots
from chest_ct.precision import precision_agreement
from chest_ct.publishing import publish
from chest_ct.records import EXCLUDED, TEST, TRAIN, Manifest
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
) -> Evaluation:
    policy = policy or BlessingPolicy()
    manifest = Manifest.load(dataset_dir)
    metadata = read_metadata(model_dir)
    threshold = float(metadata["threshold"])

    scored, seen_here = scored_test_set(model_dir, manifest, manifest.role(TEST))
    scores = score_model(model_dir, manifest, scored, threshold)
    excluded = [{"path": r.path, "given_split": r.given_split, "label": r.label, "reason": r.exclusion}
                for r in manifest.role(EXCLUDED)]
    excluded += [{"path": r.path, "given_split": r.given_split, "label": r.label,
                  "reason": f"{seen_here[r.path]} (this model's record)"}
                 for r in manifest.role(TEST) if r.path in seen_here]
    audit = shortcut_audit(manifest.role(TRAIN), scored, metadata["positive_class"], scores.per_image["roc_auc"])
    plots = save_plots({"per_group": scores.group_level(), "per_image": (scores.y, scores.prob)}, threshold,
                       metadata["class_names"], plots_dir)

    # The evaluated model is the trained one plus what evaluation found.
    if Path(out_model_dir).exists():
        shutil.rmtree(out_model_dir)
    shutil.copytree(model_dir, out_model_dir)
    evaluation = {"per_image": scores.per_image, "per_group": scores.per_group, "scored_images": scores.images,
                  "scored_groups": sum(scores.groups_per_class.values()), "excluded_images": len(excluded)}
    # Issue 14: how a bf16 server's answers differ from these float32 ones on the same split (chest_ct.precision).
    evaluation["precision_agreement"] = precision_agreement(model_dir, [manifest.file(r) for r in scored], threshold)
    write_metadata(out_model_dir, {**metadata, "mlflow_run_id": run_id, "evaluation": evaluation})

    registry.use_tracking(experiment)
    current = registry.champion(registered_model_name)
    comparison = _compare(current, out_model_dir, scores, scored, manifest)
    decision = decide(scores.per_group, policy, comparison)
    report: dict[str, Any] = {
        **evaluation, "groups_per_class": scores.groups_per_class, "threshold": threshold,
        "threshold_source": metadata.get("threshold_source", ""), "excluded": excluded,
        "champion": comparison.summary() if comparison else None, "shortcut": audit,
        "decision": {"blessed": decision.blessed, "reasons": decision.reasons, "policy": policy.to_dict()},
    }
    version = publish(run_id, Path(out_model_dir), report, plots, decision,
                      registered_model_name=registered_model_name, expected_champion=current[0] if current else None)
    log.info("evaluation: %s", "blessed" if decision.blessed else "not blessed: " + "; ".join(decision.reasons))
    return Evaluation(scores=scores, decision=decision, model_version=version, report=report,
                      plots={k: str(v) for k, v in plots.items()})


def _compare(current: tuple[str, str] | None, challenger_dir: Path, scores: Scores, scored: list[Any],
             manifest: Manifest) -> Comparison | None:
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
        return (f"| {unit} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['roc_auc']:.3f} | "
                f"{m['precision']:.3f} | {m['accuracy']:.3f} | {counts} |")

    lines = [
        "# chest-ct evaluation", "",
        f"**{'BLESSED (champion)' if result.blessed else 'NOT BLESSED'}**, registered version {result.model_version}",
        *[f"- {reason}" for reason in result.reasons], "",
        f"Scored **{r['scored_images']} test images ({r['scored_groups']} duplicate groups: "
        + ", ".join(f"{n} {c}" for c, n in s.groups_per_class.items()) + f")** at threshold {s.threshold:.4f} "
        f"({r['threshold_source'] or 'source unknown'}). Blessing uses the per-group row.", "",
        "| unit | sensitivity | specificity | ROC AUC | precision | accuracy | tp/fp/tn/fn |",
        "|---|---:|---:|---:|---:|---:|---|",
        row("per group", s.per_group), row("per image", s.per_image), "",
        f"**Excluded from the score: {r['excluded_images']}**",
        *[f"- `{e['path']}`: {e['reason']}" for e in r["excluded"][:50]], "",
        ("## " if r["shortcut"]["warning"] else "") + r["shortcut"]["message"], "",
        "Single-statistic AUCs: " + json.dumps(r["shortcut"]["single_feature_auc"]),
    ]
    return "\n".join(lines) + "\n"
