"""The HTML evaluation report: every section, everything embedded, numbers that match, a real browser.

One module fixture runs the real train step (MLflow run, out-of-fold threshold)
and the real evaluate step on small synthetic data with copies of pictures in
the test split and a file name that needs escaping, and writes the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from chest_ct.blessing import BlessingPolicy
from chest_ct.determinism import seed_everything
from chest_ct.evaluate import evaluate_model
from chest_ct.export import read_metadata
from chest_ct.gallery import CASES, FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_NEGATIVE, TRUE_POSITIVE, build_gallery, select
from chest_ct.ingest import build_dataset
from chest_ct.metrics import bootstrap_intervals, rate_metrics
from chest_ct.model import build_model
from chest_ct.model_card import COMMIT_ENV, DATA_LIMITATIONS, source_commit
from chest_ct.records import TEST, Manifest
from chest_ct.report_html import SECTIONS
from chest_ct.scoring import score_model
from chest_ct.train import train_and_export
from tests.browser import screenshot
from tests.conftest import write_dataset

ROOT = Path(__file__).resolve().parents[1]
ODD_NAME = '<b>&"odd.png'
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NO_FLOORS = BlessingPolicy(min_auc=0.0, min_sensitivity=0.0, min_specificity=0.0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    root = write_dataset(
        tmp / "src",
        {
            "train": {"adenocarcinoma": 12, "normal": 10},
            "valid": {"adenocarcinoma": 4, "normal": 4},
            "test": {"adenocarcinoma": 6, "normal": 6},
        },
    )
    test_normal = sorted((root / "test" / "normal").iterdir())
    for copy in ("copy 1.png", "copy 2.png"):  # one picture, three files: one group
        shutil.copy(test_normal[0], root / "test" / "normal" / copy)
    # A copy of a training picture: excluded from the score, and its name shown (escaped) in the report.
    shutil.copy(min((root / "train" / "normal").iterdir()), root / "test" / "normal" / ODD_NAME)
    build_dataset(root, tmp / "data")
    seed_everything(0)
    build_model(32, "none").save(tmp / "base.keras")
    with pytest.MonkeyPatch.context() as patch:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv(COMMIT_ENV, COMMIT)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("chest-ct", artifact_location=(tmp / "mlartifacts").as_uri())
        run_id = train_and_export(
            tmp / "data", tmp / "base.keras", tmp / "model", epochs=3, batch_size=8, seed=0, threshold_folds=3
        )
        result = evaluate_model(
            tmp / "model",
            tmp / "data",
            tmp / "evaluated",
            tmp / "plots",
            run_id=run_id,
            policy=NO_FLOORS,
            report_html=tmp / "report_html",
            base_weights="none",
        )
        client = MlflowClient()
        logged = Path(client.download_artifacts(run_id, "evaluation/report.html", str(tmp / "download")))
        tags = client.get_run(run_id).data.tags
    return {
        "result": result,
        "tmp": tmp,
        "run_id": run_id,
        "page": (tmp / "report_html").read_text(),
        "logged": logged.read_text(),
        "tags": tags,
    }


class _Page(HTMLParser):
    """Ids, image sources, links and tags of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.links, self.tags = set(), [], [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("href", "src", "action"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])


def test_report_has_every_section_and_needs_nothing_from_outside(evaluated):
    page = _Page(evaluated["page"])
    assert {sid for sid, _ in SECTIONS} <= page.ids
    assert not {"script", "link", "iframe", "object", "embed"} & page.tags, "no scripts, no external resources"
    assert all(link.startswith("#") for link in page.links), page.links
    assert len(page.images) >= 5 + 4, "curves, confusion matrices, calibration and gallery tiles"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "Research software, not a medical device" in evaluated["page"]
    assert evaluated["logged"] == evaluated["page"], "MLflow has the same report as evaluation/report.html"
    assert evaluated["result"].report_html == str(evaluated["tmp"] / "report_html")


def test_report_numbers_are_the_evaluation_numbers(evaluated):
    text, report = html.unescape(evaluated["page"]), evaluated["result"].report
    assert f"threshold <b>{report['threshold']:.4f}</b>".replace("<b>", "").replace("</b>", "") in re.sub(
        r"</?b>", "", text
    )
    assert report["threshold_source"] in text, "how the threshold was chosen"
    assert re.search(r"The test split played no part", text)
    folds = re.findall(r"<tr><td class=\"n\">(\d)</td>", evaluated["page"])
    assert folds == ["1", "2", "3"], "one row per out-of-fold fold, from the train step's threshold.json"
    for unit in ("per_group", "per_image"):
        assert f"{report[unit]['roc_auc']:.3f}" in text and f"{report[unit]['brier']:.3f}" in text
    assert (report["scored_images"], report["scored_groups"]) == (14, 12), "three copies are one picture"
    assert f"Scored {report['scored_images']} test images" in re.sub(r"</?b>", "", text)
    assert report["shortcut"]["message"] in text


def test_names_from_the_data_are_escaped(evaluated):
    assert html.escape(ODD_NAME) in evaluated["page"] and ODD_NAME not in evaluated["page"]
    assert any(x["path"].endswith(ODD_NAME) for x in evaluated["result"].report["excluded"])


def test_gallery_explains_what_was_scored_one_picture_per_case(evaluated):
    tmp, result = evaluated["tmp"], evaluated["result"]
    manifest = Manifest.load(tmp / "data")
    scored = [r for r in manifest.role(TEST) if not r.path.endswith(ODD_NAME)]
    scores = score_model(tmp / "evaluated", manifest, scored, result.scores.threshold)
    gallery = build_gallery(
        tmp / "evaluated",
        [manifest.file(r) for r in scored],
        [r.path for r in scored],
        scores.y,
        scores.prob,
        scores.groups,
        scores.threshold,
        manifest.classes,
    )
    by_path = {r.path: p for r, p in zip(scored, scores.prob, strict=True)}
    shown = [tile for case in CASES for tile in gallery[case]]
    assert shown and sum(len(gallery[c]) for c in CASES) == len({(t.case, t.group) for t in shown})
    for tile in shown:
        assert tile.probability == pytest.approx(by_path[tile.path], abs=1e-6), "same graph as the scores"
        assert tile.heatmap.shape == tuple(read_metadata(tmp / "evaluated")["heatmap"]["grid"])
        assert Image.open(io.BytesIO(tile.tile_png)).size == (2 * 150 + 4, 150)
        assert f"<b>{html.escape(tile.path)}</b>" in evaluated["page"]


def test_gallery_selection_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.8, 0.2, 0.7, 0.1, 0.05, 0.06, 0.95]
    g = [1, 2, 3, 4, 5, 6, 6, 1]  # 5 and 6 are copies of one picture, so are 0 and 7
    picked = select(y, p, g, threshold=0.5, per_case=2)
    assert picked[TRUE_POSITIVE] == [7, 1], "most confident first, one image of group 1"
    assert picked[FALSE_NEGATIVE] == [2] and picked[FALSE_POSITIVE] == [3]
    assert picked[TRUE_NEGATIVE] == [5, 4], "lowest probability first, one image of group 6"


def test_model_card_provenance_and_limitations(evaluated):
    text = html.unescape(evaluated["page"])
    card = text[text.index('id="model-card"') :]
    for expected in (
        "Intended use",
        "Not for",
        "Not a medical device",
        "Training data",
        "Known limitations",
        evaluated["run_id"],
        COMMIT,
        "base_weights=none",
    ):
        assert expected in card, expected
    manifest = Manifest.load(evaluated["tmp"] / "data")
    assert manifest.fingerprint in card
    assert DATA_LIMITATIONS.replace("`", "") in card
    assert evaluated["tags"]["git_commit"] == COMMIT
    assert read_metadata(evaluated["tmp"] / "evaluated")["evaluation"]["git_commit"] == COMMIT


def test_readme_data_section_is_the_model_cards_word_for_word():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What the data can and cannot show", 1)[1].split("\n## ", 1)[0]
    assert " ".join(section.split()) == " ".join(DATA_LIMITATIONS.split())


def test_source_commit(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "abc")
    assert source_commit() == "abc", "the image's build argument wins"
    monkeypatch.setenv(COMMIT_ENV, "unknown")  # the Dockerfile's default when no build argument was given
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert source_commit().startswith(head.stdout.strip())
    monkeypatch.setenv("PATH", "/nonexistent")
    assert source_commit() == "unknown", "no git, no build argument"


def test_training_image_carries_the_commit():
    """The cluster has no .git: the image gets the commit as a build argument, the card reads it from the env."""
    dockerfile = (ROOT / "Dockerfile.train").read_text()
    assert "ARG GIT_COMMIT=unknown" in dockerfile
    assert f"ENV {COMMIT_ENV}=${{GIT_COMMIT}}" in dockerfile


def test_bootstrap_intervals_hold_the_value_and_count_copies_once():
    rng = np.random.default_rng(1)
    y = np.array([1] * 30 + [0] * 30)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 60), 0, 1)
    ci = bootstrap_intervals(y, p, 0.5, rounds=300, seed=0)
    for name, est in ci.items():
        assert est.low <= est.value <= est.high and 0 <= est.low <= est.high <= 1, name
        assert est.value == rate_metrics(y, p, 0.5)[name]
    assert rate_metrics(np.array([1, 1, 0]), np.array([0.9, 0.2, 0.1]), 0.5) == {
        "sensitivity": 0.5,
        "specificity": 1.0,
        "roc_auc": 1.0,
    }
    # Ten copies of each of 8 pictures: resampling images would claim 80 independent pieces of evidence.
    pictures_y, pictures_p = [1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.6, 0.4, 0.8, 0.3, 0.5, 0.7, 0.1]
    yy, pp, groups = np.repeat(pictures_y, 10), np.repeat(pictures_p, 10), np.repeat(np.arange(8), 10)
    as_images = bootstrap_intervals(yy, pp, 0.5, rounds=300, seed=0)["roc_auc"]
    as_groups = bootstrap_intervals(yy, pp, 0.5, groups=groups, rounds=300, seed=0)["roc_auc"]
    assert as_groups.high - as_groups.low > as_images.high - as_images.low
    with pytest.raises(ValueError, match="need both classes"):
        bootstrap_intervals([1, 1], [0.2, 0.3], 0.5)


def test_report_in_a_real_browser(evaluated, browser, tmp_path):
    """Open the report as a person would: every section visible, every image decoded, a screenshot to look at."""
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"  # as MLflow serves it; KFP's artifact file has no extension
    shutil.copyfile(evaluated["tmp"] / "report_html", page)
    browser.get(page.as_uri())
    assert browser.title.startswith("chest-ct evaluation: chest-ct version")
    for sid, heading in SECTIONS:
        section = browser.find_element(By.ID, sid)
        assert section.is_displayed(), sid
        assert section.find_element(By.TAG_NAME, "h2").text == heading
        assert section.size["height"] > 40, f"{sid} has content"
    images = browser.find_elements(By.TAG_NAME, "img")
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
    )
    assert images and broken == [], broken
    gallery = browser.find_element(By.ID, "gradcam")
    assert gallery.find_elements(By.TAG_NAME, "figure"), "Grad-CAM tiles shown"
    shot = screenshot(browser, tmp_path / "report.png")
    assert Image.open(shot).size[1] > 2000, "the whole page, not one window"
    print(f"screenshot: {shot}")


def test_report_is_written_only_when_asked(evaluated):
    summary = json.loads(json.dumps(evaluated["result"].report))  # JSON-serialisable as before
    assert "report_html" not in summary and summary["git_commit"] == COMMIT
