"""Checks on the real chest CT data in ../shared/data/chest-ct (skipped where it is absent)."""

import json
from pathlib import Path

import pytest

from chest_ct.defaults import MIN_AUC, MIN_SENSITIVITY, MIN_SPECIFICITY, VALID_FRACTION
from chest_ct.ingest import build_dataset
from chest_ct.records import Manifest
from tests.conftest import SHARED_DATA
from tests.test_pipeline_local import FAST, run_local

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (SHARED_DATA / "train").is_dir(),
        reason=f"real data not found at {SHARED_DATA} (it lives in ../shared beside the checkout)",
    ),
]
KNOWN_LEAKS = {"valid/normal/5.png", "valid/adenocarcinoma/000110 (7).png"}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "out"
    return build_dataset(SHARED_DATA, out, source_uri=str(SHARED_DATA)), Manifest.load(out)


def test_every_file_is_accounted_for(ingested):
    report, _ = ingested
    on_disk = sum(1 for p in SHARED_DATA.rglob("*") if p.is_file())
    assert report["files"] == {"found": on_disk, "images": 258, "quarantined": 0, "ignored": on_disk - 258}
    assert {i["path"] for i in report["ignored"]} >= {"README.md", "SHA256SUMS", "manifest.csv"}


def test_known_leaks_are_reported_and_kept_out_of_the_score(ingested):
    report, _ = ingested
    leaked = {m["path"] for leak in report["leaks"] for m in leak["members"] if m["given_split"] == "valid"}
    assert KNOWN_LEAKS <= leaked
    assert KNOWN_LEAKS <= {e["path"] for e in report["excluded"]}
    # The given valid folder (8 + 4) is the test role, less the copies of pictures the model sees.
    assert report["counts"]["test"] == {"normal": 3, "adenocarcinoma": 7}


def test_no_test_image_shares_a_group_with_fitting_data(ingested):
    _, manifest = ingested
    fitting = {r.group for r in manifest.records if r.split in ("train", "valid")}
    assert not fitting & {r.group for r in manifest.role("test")}


def test_valid_is_a_share_of_all_distinct_pictures(ingested):
    report, manifest = ingested
    for label in manifest.classes:
        groups = {r.group for r in manifest.records if r.label == label}
        assert report["pictures"]["valid"][label] == max(1, round(VALID_FRACTION * len(groups)))


def test_normal_class_is_mostly_copies(ingested):
    report, _ = ingested
    normal_groups = {
        tuple(sorted(m["path"] for m in g["members"]))
        for g in report["duplicate_groups"]
        if g["members"][0]["label"] == "normal"
    }
    copies = sum(len(g) for g in normal_groups)
    assert copies >= 40, "train/normal has 60 files but few distinct pictures"


@pytest.mark.slow
def test_pipeline_on_real_data_scores_only_unseen_pictures_and_blesses_per_group(tmp_path):
    params = [p for p in FAST if not p.startswith("min_")]  # the default floors
    proc = run_local(tmp_path, str(SHARED_DATA), *params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["scored_images"], result["scored_groups"]) == (10, 10) and result["excluded_images"] >= 2
    evaluation = json.loads(Path(result["evaluation_report"]).read_text())
    assert KNOWN_LEAKS <= {e["path"] for e in evaluation["excluded"]}
    floors = {"roc_auc": MIN_AUC, "sensitivity": MIN_SENSITIVITY, "specificity": MIN_SPECIFICITY}
    below = [name for name, floor in floors.items() if not evaluation["per_group"][name] >= floor]
    assert result["blessed"] == (not below)
    for name in below:
        assert any(r.startswith(f"per-group {name} ") for r in evaluation["decision"]["reasons"])
    # On this data image statistics alone separate the classes (see the data README).
    assert "image statistics alone" in proc.stdout + proc.stderr
