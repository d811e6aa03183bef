"""Checks on the real chest CT data in ../shared/data/chest-ct (skipped where it is absent)."""

import json

import pytest

from chest_ct.ingest import build_dataset
from tests.conftest import SHARED_DATA
from tests.test_pipeline_local import FAST, run_local

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (SHARED_DATA / "train").is_dir(),
                       reason=f"real data not found at {SHARED_DATA} (it lives in ../shared beside the checkout)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return build_dataset(SHARED_DATA, tmp_path_factory.mktemp("real") / "out", source_uri=str(SHARED_DATA))


def test_all_images_decode_and_counts_match_the_data_readme(report):
    assert report["quarantined"] == []
    assert report["images"] == 258
    totals = {split: sum(c.values()) for split, c in report["counts"].items()}
    assert totals["test"] == 12, "the given valid split (8 + 4) is kept whole for evaluation"
    assert report["counts"]["test"] == {"normal": 4, "adenocarcinoma": 8}
    assert totals["train"] + totals["valid"] == 246


def test_known_leaks_between_train_and_valid_are_reported(report):
    leaked = {m["path"] for leak in report["leaks"] for m in leak["members"] if m["source_split"] == "valid"}
    assert "valid/normal/5.png" in leaked
    assert "valid/adenocarcinoma/000110 (7).png" in leaked


def test_normal_class_is_mostly_copies(report):
    normal_groups = {tuple(sorted(m["path"] for m in g["members"])) for g in report["duplicate_groups"]
                     if g["members"][0]["label"] == "normal"}
    copies = sum(len(g) for g in normal_groups)
    assert copies >= 40, "train/normal has 60 files but few distinct pictures"


@pytest.mark.slow
def test_pipeline_on_real_data_flags_the_shortcut(tmp_path):
    proc = run_local(tmp_path, str(SHARED_DATA), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["metrics"]["roc_auc"] <= 1.0
    # On this data image statistics alone separate the classes (see the data README).
    assert "image statistics alone" in proc.stdout + proc.stderr
