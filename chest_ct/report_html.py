"""The evaluation report as one self-contained HTML page (images embedded, no scripts, nothing fetched).

It is what a person reads in the Kubeflow UI (an ``HTML`` artifact, shown in a
sandboxed iframe) and in MLflow (``evaluation/report.html``), so everything it
shows travels inside the file: plots and Grad-CAM tiles as ``data:`` PNGs,
styles inline. Written with :mod:`html` only; every value from the data (file
names, reasons) is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chest_ct.gallery import CASES, Explained
from chest_ct.html_parts import CSS, count, e, items, num, png, table
from chest_ct.metrics import Estimate
from chest_ct.model_card import ModelCard, card_html, random_base

#: (id, heading) of every section, in order: the browser test checks each one is visible.
SECTIONS = (
    ("summary", "Summary and decision"),
    ("threshold", "Threshold and how it was chosen"),
    ("metrics", "Metrics with 95% intervals"),
    ("curves", "ROC and precision-recall"),
    ("confusion", "Confusion matrices"),
    ("calibration", "Calibration"),
    ("shortcut", "Shortcut audit"),
    ("guard", "Out-of-distribution guard"),
    ("gradcam", "Grad-CAM gallery"),
    ("excluded", "Images kept out of the score"),
    ("model-card", "Model card"),
)
UNITS = (("per_group", "per picture (each duplicate group once)"), ("per_image", "per image"))
NAMES = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "roc_auc": "ROC AUC",
    "precision": "precision",
    "f1": "F1",
    "accuracy": "accuracy",
    "brier": "Brier score",
    "loss": "log loss",
}


@dataclass
class ReportContent:
    """Everything the report shows; built by :func:`chest_ct.evaluate.evaluate_model`."""

    report: dict[str, Any]  # the JSON evaluation report (metrics, decision, audit, exclusions)
    intervals: dict[str, dict[str, Estimate]]  # unit -> metric -> bootstrap estimate
    calibration: dict[str, dict[str, Any]]  # unit -> chest_ct.metrics.calibration on the test split
    plots: dict[str, Path]
    gallery: dict[str, list[Explained]]
    class_names: Sequence[str]
    threshold_choice: dict[str, Any] = field(default_factory=dict)  # the train step's training/threshold.json
    heatmap_grid: Sequence[int] = ()


def _summary(c: ReportContent, card: ModelCard) -> str:
    r, decision = c.report, c.report["decision"]
    verdict = (
        f'<div class="good"><b>Blessed</b>: registered version {e(card.registered_version)} is the champion'
        if decision["blessed"]
        else f'<div class="bad"><b>Not blessed</b>: registered version {e(card.registered_version)} stays a candidate'
    )
    g = c.intervals["per_group"]
    champion = r.get("champion") or {}
    compare = ""
    if champion:
        compare = (
            f"<p>Champion version {e(champion.get('champion_version'))}: "
            + e(
                champion.get("error")
                or champion.get("unavailable")
                or f"per-picture ROC AUC {champion.get('champion_auc', float('nan')):.3f} against this model's "
                f"{champion.get('challenger_auc', float('nan')):.3f} on {champion.get('images')} test images "
                "neither saw"
            )
            + "</p>"
        )
    shortcut = r["shortcut"]
    return (
        f"{verdict}{items(decision['reasons'])}</div>"
        + (f'<div class="bad"><b>{e(shortcut["message"])}</b></div>' if shortcut["warning"] else "")
        + f"<p>Scored <b>{r['scored_images']}</b> test images the model never saw "
        f"(<b>{r['scored_groups']}</b> distinct pictures: "
        + ", ".join(f"{n} {e(label)}" for label, n in r["groups_per_class"].items())
        + f"), at threshold <b>{r['threshold']:.4f}</b>; {count(r['excluded_images'], 'image')} kept out of the "
        "score. "
        "Per picture, with 95% bootstrap intervals: "
        + "; ".join(f"{NAMES[name]} {g[name].value:.3f} [{g[name].low:.3f}, {g[name].high:.3f}]" for name in g)
        + ".</p>"
        + compare
    )


def _threshold(c: ReportContent) -> str:
    t = c.threshold_choice
    out = (
        f"<p>Threshold <b>{c.report['threshold']:.4f}</b>: {e(c.report['threshold_source'] or 'source unknown')}"
        "</p><p>The train step chose it from out-of-fold predictions over the fitting images (train and "
        "valid roles, each duplicate group whole in one fold): the highest threshold whose per-picture "
        "sensitivity reaches the target. The test split played no part in choosing it.</p>"
    )
    if t:
        folds = [
            [i + 1, thr, m.get("sensitivity", float("nan")), m.get("specificity", float("nan")), m.get("groups")]
            for i, (thr, m) in enumerate(zip(t.get("fold_thresholds", []), t.get("fold_metrics", []), strict=False))
        ]
        cal = t.get("calibration", {}).get("per_group", {})
        out += (
            f"<p>Target sensitivity {t.get('target_sensitivity')}, {t.get('folds')} folds, "
            f"{t.get('images')} fitting images; spread of the per-fold thresholds {t.get('spread', 0):.3f}; "
            f"out-of-fold Brier {cal.get('brier', float('nan')):.3f}, ECE {cal.get('ece', float('nan')):.3f} "
            "per picture.</p>"
            + table(
                [
                    "fold",
                    "threshold this fold alone would choose",
                    "sensitivity at the chosen threshold",
                    "specificity at the chosen threshold",
                    "pictures",
                ],
                folds,
            )
        )
    return out


def _metrics(c: ReportContent) -> str:
    def cell(unit: str, name: str) -> str:
        est = c.intervals[unit].get(name)
        value = c.report[unit][name]
        return f"{value:.3f}" + (f" <span class='muted'>[{est.low:.3f}, {est.high:.3f}]</span>" if est else "")

    names = ("sensitivity", "specificity", "roc_auc", "precision", "f1", "accuracy", "brier", "loss")
    rows = [[e(NAMES[n]), *(cell(u, n) for u, _ in UNITS)] for n in names]
    rows.append(
        ["tp / fp / tn / fn", *("/".join(str(c.report[u][k]) for k in ("tp", "fp", "tn", "fn")) for u, _ in UNITS)]
    )
    return (
        table(["metric", *(label for _, label in UNITS)], rows)
        + "<p class='muted'>Intervals: 95% percentile bootstrap, resampling whole duplicate groups within each "
        "class (copies of one picture are not independent evidence), for sensitivity, specificity and ROC "
        "AUC. With few distinct pictures they are wide, and that is the point.</p>"
    )


def _plots(c: ReportContent, names: Sequence[str]) -> str:
    return (
        "<div class='plots'>" + "".join(png(c.plots[n], n.replace("_", " ")) for n in names if n in c.plots) + "</div>"
    )


def _calibration(c: ReportContent) -> str:
    rows = [[label, c.calibration[u]["brier"], c.calibration[u]["ece"], c.calibration[u]["n"]] for u, label in UNITS]
    return _plots(c, ["calibration"]) + table(["unit", "Brier score", "expected calibration error", "n"], rows)


def _shortcut(c: ReportContent) -> str:
    a = c.report["shortcut"]
    bars = [
        ("the model (per image)", a["model_auc"]),
        ("image statistics together", a["statistics_auc"]),
        *((f"{name} alone", auc) for name, auc in a["single_feature_auc"].items()),
    ]
    rows = [[e(name), auc, f"<span class='bar' style='width:{max(auc, 0) * 300:.0f}px'></span>"] for name, auc in bars]
    return (
        f"<div class='{'bad' if a['warning'] else 'good'}'>{e(a['message'])}</div>"
        "<p>A logistic regression on image statistics only (" + e(", ".join(a["features"])) + ") is fitted on "
        "the train split and scored on the same test images as the model. If it comes within "
        f"{a['margin']} of the model's AUC, the model's score may come from how the images were collected.</p>"
        + table(["scorer", "ROC AUC", ""], rows)
    )


def _guard(c: ReportContent) -> str:
    g = c.report.get("guard")
    if not g:
        return "<p class='muted'>This model has no out-of-distribution guard (exported before it existed).</p>"
    verdict = [
        (
            g["meets_accept_target"],
            f"accepts {g['test_accepted']} of {g['test_images']} test CT images "
            f"({g['test_accept_rate']:.1%}, target {g['min_accept_rate']:.0%})",
        ),
        (
            g["meets_reject_target"],
            f"rejects {g['foreign_rejected']} of {g['foreign_images']} foreign images "
            f"({g['foreign_reject_rate']:.1%}, target {g['min_reject_rate']:.0%})",
        ),
    ]
    rows = [
        [e(name), int(v["images"]), int(v["rejected"]), f"{v['reject_rate']:.1%}"]
        for name, v in sorted(g["per_category"].items())
    ]
    return (
        "".join(f"<div class='{'good' if ok else 'bad'}'>The guard {e(text)}.</div>" for ok, text in verdict)
        + f"<p>An image whose <code>ood_score</code> is over {num(g['threshold'])} is answered "
        "<code>unsupported-input</code> by the server instead of a label. The foreign set is fixed "
        "(chest_ct/foreign.py): natural photos, noise, solid colours, gradients, text, CT windowed for bone, "
        "flipped and inverted CT.</p>" + table(["foreign category", "images", "rejected", "reject rate"], rows)
    )


def _gallery(c: ReportContent, card: ModelCard) -> str:
    grid = "x".join(str(n) for n in c.heatmap_grid) or "?"
    out = (
        "<div class='notice'>This model's VGG16 base has random weights (base_weights=none): its last conv layer "
        "keeps little of where things are, so these maps say little. Train with ImageNet weights to read them."
        "</div>"
        if random_base(card.base_weights)
        else ""
    )
    out += (
        "<p>The scan as the model sees it (resized to a square) and the Grad-CAM map of the adenocarcinoma score "
        f"from the exported model's explain signature ({grid} grid, upsampled): <span class='legend'></span> "
        "low to high contribution; uncoloured: none. One image per duplicate group; most confident, or most "
        "confidently wrong, first.</p>"
    )
    for case in CASES:
        tiles = c.gallery.get(case, [])
        figures = "".join(
            f"<figure>{png(t.tile_png, f'{case}: {t.path}')}<figcaption><b>{e(t.path)}</b><br>truth {e(t.label)}, "
            f"p(adenocarcinoma) {t.probability:.3f}"
            + ("; no region raises the score" if float(t.heatmap.max()) == 0.0 else "")
            + "</figcaption></figure>"
            for t in tiles
        )
        out += f"<h3>{e(case.capitalize())}s ({len(tiles)} shown)</h3>" + (
            f"<div class='tiles'>{figures}</div>" if tiles else "<p class='muted'>None in the test split.</p>"
        )
    return out


def _excluded(c: ReportContent) -> str:
    rows = [[e(x["path"]), e(x["given_split"]), e(x["label"]), e(x["reason"])] for x in c.report["excluded"]]
    if not rows:
        return "<p>None: every test image was scored.</p>"
    return (
        f"<details{' open' if len(rows) <= 15 else ''}><summary>{count(len(rows), 'image')}</summary>"
        + table(["path", "given split", "label", "reason"], rows)
        + "</details>"
    )


def render(c: ReportContent, card: ModelCard) -> str:
    body = {
        "summary": _summary(c, card),
        "threshold": _threshold(c),
        "metrics": _metrics(c),
        "curves": _plots(c, ["roc_curve", "precision_recall_curve"]),
        "confusion": _plots(c, ["confusion_matrix_per_group", "confusion_matrix_per_image"]),
        "calibration": _calibration(c),
        "shortcut": _shortcut(c),
        "guard": _guard(c),
        "gradcam": _gallery(c, card),
        "excluded": _excluded(c),
        "model-card": card_html(card),
    }
    title = f"chest-ct evaluation: {card.model_name} version {card.registered_version}"
    nav = "".join(f'<a href="#{sid}">{e(heading)}</a>' for sid, heading in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{e(heading)}</h2>{body[sid]}</section>' for sid, heading in SECTIONS)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body><main><h1>{e(title)}</h1>"
        '<div class="notice"><b>Research software, not a medical device.</b> These numbers describe this test '
        "split only; read the shortcut audit and the model card before trusting them.</div>"
        f"<p class='muted'>MLflow run <code>{e(card.mlflow_run_id)}</code>, commit "
        f"<code>{e(card.git_commit)}</code></p><nav>{nav}</nav>{sections}</main></body></html>\n"
    )


def write_report(content: ReportContent, card: ModelCard, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(content, card), encoding="utf-8")
    return path
