import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from chest_ct.ingest import DatasetError, build_dataset, normalise_class_name, report_markdown, split_files
from tests.conftest import synthetic_image, write_dataset


def records(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["records"]


def groups_stay_on_one_side(recs: list[dict]) -> bool:
    splits = defaultdict(set)
    for r in recs:
        splits[r["group"]].add(r["split"])
    return all(len(s) == 1 for s in splits.values())


@pytest.mark.parametrize("folder, expected", [
    ("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "adenocarcinoma"),
    ("Normal", "normal"),
    (" normal ", "normal"),
    ("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", "large.cell.carcinoma"),
])
def test_normalise_class_name(folder, expected):
    assert normalise_class_name(folder) == expected


def test_presplit_layout_keeps_given_splits(tmp_path, presplit_dataset):
    report = build_dataset(presplit_dataset, tmp_path / "out", source_uri="local")
    assert report["layout"] == "pre-split"
    assert report["counts"] == {"train": {"normal": 12, "adenocarcinoma": 14}, "valid": {"normal": 6, "adenocarcinoma": 6},
                                "test": {"normal": 6, "adenocarcinoma": 6}}
    assert report["quarantined"] == [] and report["leaks"] == [] and report["duplicate_groups"] == []
    recs = records(tmp_path / "out")
    assert all(r["split"] == r["source_split"] for r in recs)
    assert all((tmp_path / "out" / r["file"]).read_bytes() == (presplit_dataset / r["path"]).read_bytes() for r in recs)
    files, labels = split_files(tmp_path / "out", "test")
    assert len(files) == 12 and sorted(set(labels)) == [0, 1]


def test_fingerprint_is_stable_and_tracks_content(tmp_path, presplit_dataset):
    a = build_dataset(presplit_dataset, tmp_path / "a")["fingerprint"]
    assert build_dataset(presplit_dataset, tmp_path / "b")["fingerprint"] == a
    victim = next((presplit_dataset / "train" / "normal").iterdir())
    victim.write_bytes(synthetic_image("normal", 999))
    assert build_dataset(presplit_dataset, tmp_path / "c")["fingerprint"] != a


def test_train_valid_layout_evaluates_on_given_valid(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": {"adenocarcinoma": 20, "normal": 20},
                                          "valid": {"adenocarcinoma": 4, "normal": 4}},
                         folder_names={"adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib"})
    report = build_dataset(root, tmp_path / "out", valid_fraction=0.2)
    recs = records(tmp_path / "out")
    assert {r["split"] for r in recs if r["source_split"] == "valid"} == {"test"}
    carved = [r for r in recs if r["source_split"] == "train" and r["split"] == "valid"]
    assert {r["label"] for r in carved} == {"adenocarcinoma", "normal"}
    assert 4 <= len(carved) <= 12
    assert report["counts"]["test"] == {"normal": 4, "adenocarcinoma": 4}


def test_flat_layout_is_split_by_duplicate_groups(tmp_path):
    root = write_dataset(tmp_path / "Data" / "chest", {"": {"adenocarcinoma": 30, "normal": 30}})
    # Copies of one picture must land in one split: make 5 copies of 4 pictures.
    for cls in ("adenocarcinoma", "normal"):
        for src in sorted((root / cls).iterdir())[:2]:
            for k in range(4):
                shutil.copy(src, src.with_name(f"{src.stem} - Copy ({k}).png"))
    report = build_dataset(tmp_path / "Data", tmp_path / "out", seed=7)
    recs = records(tmp_path / "out")
    assert report["layout"] == "flat" and report["dataset_root"].endswith("chest"), "wrapper folders are skipped"
    assert {r["split"] for r in recs} == {"train", "valid", "test"}
    for split in ("train", "valid", "test"):
        assert {r["label"] for r in recs if r["split"] == split} == {"adenocarcinoma", "normal"}
    assert groups_stay_on_one_side(recs)
    assert len(report["duplicate_groups"]) == 4 and all(g["kind"] == "exact" for g in report["duplicate_groups"])
    assert report["leaks"] == [], "splits the pipeline makes never leak"
    again = build_dataset(tmp_path / "Data", tmp_path / "out2", seed=7)
    assert again["fingerprint"] == report["fingerprint"], "the split is fixed by the seed"


def near_copy(data: bytes) -> bytes:
    """The same picture with a thin line drawn on it, like the shared data's marked copies."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    ImageDraw.Draw(img).line([(0, 3), (img.width, 3)], fill=(255, 255, 255), width=1)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_duplicates_within_and_across_given_splits(tmp_path, presplit_dataset):
    train_img = sorted((presplit_dataset / "train" / "normal").iterdir())[0]
    shutil.copy(train_img, presplit_dataset / "test" / "normal" / "leaked copy.png")
    shutil.copy(train_img, presplit_dataset / "train" / "normal" / "same - Copy.png")
    ade = sorted((presplit_dataset / "train" / "adenocarcinoma").iterdir())[0]
    (presplit_dataset / "valid" / "adenocarcinoma" / "marked.png").write_bytes(near_copy(ade.read_bytes()))
    report = build_dataset(presplit_dataset, tmp_path / "out")
    by_size = sorted(report["duplicate_groups"], key=lambda g: len(g["members"]))
    assert [len(g["members"]) for g in by_size] == [2, 3]
    near, exact = by_size
    assert near["kind"] == "near" and exact["kind"] == "exact"
    assert {(m["source_split"], m["path"]) for m in exact["members"]} == {
        ("train", f"train/normal/{train_img.name}"), ("train", "train/normal/same - Copy.png"),
        ("test", "test/normal/leaked copy.png")}
    assert {(m["source_split"], m["path"]) for m in near["members"]} == {
        ("train", f"train/adenocarcinoma/{ade.name}"), ("valid", "valid/adenocarcinoma/marked.png")}
    assert len(report["leaks"]) == 2
    md = report_markdown(report)
    assert "leaks across given splits: 2" in md and "leaked copy.png" in md


def test_bad_files_are_quarantined_and_listed(tmp_path, presplit_dataset):
    folder = presplit_dataset / "train" / "normal"
    good = synthetic_image("normal", 500, size=64)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("not an image either")
    report = build_dataset(presplit_dataset, tmp_path / "out")
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {"train/normal/truncated.png", "train/normal/notes.txt", "train/normal/fake.png"}
    assert "cannot decode" in reasons["train/normal/truncated.png"]
    assert "suffix '.txt'" in reasons["train/normal/notes.txt"]
    assert "not an image" in reasons["train/normal/fake.png"]
    for path in reasons:  # never lost: kept aside for a person to look at
        assert (tmp_path / "out" / "quarantine" / path).read_bytes() == (presplit_dataset / path).read_bytes()
    assert report["counts"]["train"]["normal"] == 12
    assert "Quarantined: 3" in report_markdown(report)


def test_other_classes_are_reported_as_ignored(tmp_path, presplit_dataset):
    write_dataset(presplit_dataset, {"train": {"squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa": 2}}, offset=900)
    report = build_dataset(presplit_dataset, tmp_path / "out")
    assert report["ignored_classes"] == ["squamous.cell.carcinoma"]
    assert report["images"] == 50


def test_missing_class_folders(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no class folders for normal, adenocarcinoma \(found \['images', 'labels'\]\)"):
        build_dataset(root, tmp_path / "out")


def test_single_class(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": {"adenocarcinoma": 3, "normal": 3}, "valid": {"normal": 3}})
    with pytest.raises(DatasetError, match=r"d/valid: only \['normal'\] present, missing class folder\(s\) \['adenocarcinoma'\]"):
        build_dataset(root, tmp_path / "out")


def test_empty_dataset(tmp_path):
    root = tmp_path / "d"
    for cls in ("normal", "adenocarcinoma"):
        (root / cls).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable images"):
        build_dataset(root, tmp_path / "out")


def test_split_without_train(tmp_path):
    root = write_dataset(tmp_path / "d", {"valid": {"adenocarcinoma": 3, "normal": 3}})
    with pytest.raises(DatasetError, match="no train/ folder"):
        build_dataset(root, tmp_path / "out")


def test_too_few_distinct_pictures_to_carve(tmp_path):
    root = write_dataset(tmp_path / "d", {"": {"adenocarcinoma": 10, "normal": 1}})
    with pytest.raises(DatasetError, match="each class needs at least 2 distinct pictures"):
        build_dataset(root, tmp_path / "out")


@pytest.mark.parametrize("kwargs", [{"valid_fraction": 0.0}, {"test_fraction": 0.7}])
def test_bad_fractions(tmp_path, presplit_dataset, kwargs):
    with pytest.raises(DatasetError, match=f"{next(iter(kwargs))}=.*expected a fraction"):
        build_dataset(presplit_dataset, tmp_path / "out", **kwargs)
