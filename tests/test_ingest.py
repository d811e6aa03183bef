import io
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from chest_ct.ingest import build_dataset
from chest_ct.ingest_report import report_markdown
from chest_ct.layout import normalise_class_name
from chest_ct.records import MANIFEST_FILE, DatasetError, ImageRecord, Manifest
from tests.conftest import synthetic_image, write_dataset


def records(out: Path) -> list[ImageRecord]:
    return Manifest.load(out).records


def groups_stay_on_one_side(recs: list[ImageRecord]) -> bool:
    splits = defaultdict(set)
    for r in recs:
        splits[r.group].add(r.split)
    return all(len(s) == 1 for s in splits.values())


def near_copy(data: bytes) -> bytes:
    """The same picture with a thin line drawn on it, like the shared data's marked copies."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    ImageDraw.Draw(img).line([(0, 3), (img.width, 3)], fill=(255, 255, 255), width=1)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "folder, expected",
    [
        ("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "adenocarcinoma"),
        ("Normal", "normal"),
        (" normal ", "normal"),
        ("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", "large.cell.carcinoma"),
    ],
)
def test_normalise_class_name(folder, expected):
    assert normalise_class_name(folder) == expected


def test_presplit_layout_keeps_given_splits(tmp_path, presplit_dataset):
    report = build_dataset(presplit_dataset, tmp_path / "out", source_uri="local")
    assert report["layout"] == "pre-split"
    assert report["counts"] == {
        "train": {"normal": 12, "adenocarcinoma": 14},
        "valid": {"normal": 6, "adenocarcinoma": 6},
        "test": {"normal": 6, "adenocarcinoma": 6},
        "excluded": {"normal": 0, "adenocarcinoma": 0},
    }
    assert report["files"] == {"found": 50, "images": 50, "quarantined": 0, "ignored": 0}
    assert report["quarantined"] == [] and report["leaks"] == [] and report["excluded"] == []
    manifest = Manifest.load(tmp_path / "out")
    assert all(r.split == r.given_split for r in manifest.records)
    assert all(
        (tmp_path / "out" / r.stored_as).read_bytes() == (presplit_dataset / r.path).read_bytes()
        for r in manifest.records
    )
    files, labels = manifest.files_and_labels("test")
    assert len(files) == 12 and sorted(set(labels)) == [0, 1]
    assert Manifest.load(tmp_path / "out") == manifest, "records round-trip through manifest.json"


def test_old_manifest_is_refused_with_the_remedy(tmp_path, presplit_dataset):
    build_dataset(presplit_dataset, tmp_path / "out")
    path = tmp_path / "out" / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 1}))
    with pytest.raises(DatasetError, match="format_version 1, expected 2; re-run the ingest step"):
        Manifest.load(tmp_path / "out")
    with pytest.raises(DatasetError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_fingerprint_is_stable_and_tracks_content(tmp_path, presplit_dataset):
    a = build_dataset(presplit_dataset, tmp_path / "a")["fingerprint"]
    assert build_dataset(presplit_dataset, tmp_path / "b")["fingerprint"] == a
    victim = next((presplit_dataset / "train" / "normal").iterdir())
    victim.write_bytes(synthetic_image("normal", 999))
    assert build_dataset(presplit_dataset, tmp_path / "c")["fingerprint"] != a


def test_train_valid_layout_scores_on_given_valid_and_carves_a_share_of_all_groups(tmp_path):
    root = write_dataset(
        tmp_path / "d",
        {"train": {"adenocarcinoma": 20, "normal": 20}, "valid": {"adenocarcinoma": 4, "normal": 4}},
        folder_names={"adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib"},
    )
    report = build_dataset(root, tmp_path / "out", valid_fraction=0.2)
    recs = records(tmp_path / "out")
    assert {r.split for r in recs if r.given_split == "valid"} == {"test"}
    # 24 distinct pictures per class in the whole dataset: 0.2 of them is 5 per class, taken from train.
    assert report["counts"]["valid"] == {"normal": 5, "adenocarcinoma": 5}
    assert all(r.given_split == "train" for r in recs if r.split == "valid")
    assert report["counts"]["test"] == {"normal": 4, "adenocarcinoma": 4}


def test_flat_layout_fractions_are_shares_of_all_groups_per_class(tmp_path):
    root = write_dataset(tmp_path / "Data" / "chest", {"": {"adenocarcinoma": 30, "normal": 30}})
    # Copies of one picture must land in one split: make 5 copies of 4 pictures.
    for cls in ("adenocarcinoma", "normal"):
        for src in sorted((root / cls).iterdir())[:2]:
            for k in range(4):
                shutil.copy(src, src.with_name(f"{src.stem} - Copy ({k}).png"))
    report = build_dataset(tmp_path / "Data", tmp_path / "out", seed=7, valid_fraction=0.1, test_fraction=0.2)
    recs = records(tmp_path / "out")
    assert report["layout"] == "flat" and report["dataset_root"].endswith("chest"), "wrapper folders are skipped"
    assert report["pictures"]["test"] == {"normal": 6, "adenocarcinoma": 6}, "0.2 of 30 pictures per class"
    assert report["pictures"]["valid"] == {"normal": 3, "adenocarcinoma": 3}, "0.1 of 30, not 0.1 of what is left"
    assert report["pictures"]["train"] == {"normal": 21, "adenocarcinoma": 21}
    assert groups_stay_on_one_side(recs)
    assert len(report["duplicate_groups"]) == 4 and all(g["kind"] == "exact" for g in report["duplicate_groups"])
    assert report["leaks"] == [] and report["excluded"] == [], "splits the pipeline makes never leak"
    again = build_dataset(tmp_path / "Data", tmp_path / "out2", seed=7, valid_fraction=0.1, test_fraction=0.2)
    assert again["fingerprint"] == report["fingerprint"], "the split is fixed by the seed"
    other = build_dataset(tmp_path / "Data", tmp_path / "out3", seed=8, valid_fraction=0.1, test_fraction=0.2)
    assert other["fingerprint"] != report["fingerprint"], "another seed, another split"


def test_copies_of_fitted_pictures_are_excluded_from_scoring(tmp_path, presplit_dataset):
    train_img = sorted((presplit_dataset / "train" / "normal").iterdir())[0]
    shutil.copy(train_img, presplit_dataset / "test" / "normal" / "leaked copy.png")
    shutil.copy(train_img, presplit_dataset / "train" / "normal" / "same - Copy.png")
    ade = sorted((presplit_dataset / "train" / "adenocarcinoma").iterdir())[0]
    (presplit_dataset / "valid" / "adenocarcinoma" / "marked.png").write_bytes(near_copy(ade.read_bytes()))
    valid_img = sorted((presplit_dataset / "valid" / "normal").iterdir())[0]
    (presplit_dataset / "test" / "normal" / "from valid.png").write_bytes(near_copy(valid_img.read_bytes()))
    report = build_dataset(presplit_dataset, tmp_path / "out")

    by_size = sorted(report["duplicate_groups"], key=lambda g: (len(g["members"]), g["kind"]))
    assert [(len(g["members"]), g["kind"]) for g in by_size] == [(2, "near"), (2, "near"), (3, "exact")]
    assert {(m["given_split"], m["path"]) for m in by_size[-1]["members"]} == {
        ("train", f"train/normal/{train_img.name}"),
        ("train", "train/normal/same - Copy.png"),
        ("test", "test/normal/leaked copy.png"),
    }
    assert len(report["leaks"]) == 3
    excluded = {e["path"]: e["reason"] for e in report["excluded"]}
    assert set(excluded) == {
        "test/normal/leaked copy.png",
        "valid/adenocarcinoma/marked.png",
        "test/normal/from valid.png",
    }
    assert excluded["test/normal/leaked copy.png"].startswith(
        f"copy of a picture the model sees (train: train/normal/{train_img.name}, train/normal/same - Copy.png)"
    )
    assert "would have been valid" in excluded["valid/adenocarcinoma/marked.png"]
    assert f"(valid: {valid_img.relative_to(presplit_dataset).as_posix()})" in excluded["test/normal/from valid.png"]
    assert report["counts"]["test"] == {"normal": 6, "adenocarcinoma": 6}, "the copies are not scored"
    assert report["counts"]["excluded"] == {"normal": 2, "adenocarcinoma": 1}
    md = report_markdown(report)
    assert "Leaks across given splits: 3" in md and "Excluded from training and scoring: 3" in md
    assert "leaked copy.png" in md


def test_label_conflicts_are_kept_out_of_training_and_scoring(tmp_path, presplit_dataset):
    src = sorted((presplit_dataset / "train" / "normal").iterdir())[0]
    shutil.copy(src, presplit_dataset / "train" / "adenocarcinoma" / "mislabelled.png")
    shutil.copy(src, presplit_dataset / "test" / "normal" / "again.png")
    report = build_dataset(presplit_dataset, tmp_path / "out")
    (conflict,) = report["label_conflicts"]
    paths = {m["path"] for m in conflict["members"]}
    assert paths == {f"train/normal/{src.name}", "train/adenocarcinoma/mislabelled.png", "test/normal/again.png"}
    excluded = {e["path"]: e["reason"] for e in report["excluded"]}
    assert set(excluded) == paths and all(r.startswith("label conflict") for r in excluded.values())
    assert report["counts"]["train"] == {"normal": 11, "adenocarcinoma": 14}
    assert "Label conflicts: 1" in report_markdown(report)


def test_every_file_of_a_messy_tree_is_accounted_for(tmp_path, presplit_dataset):
    root = presplit_dataset
    extra = {
        "README.md": "loose file at the top level",
        "train/stray.png": "loose file in split folder 'train/'",
        "docs/notes.png": "unknown top-level folder 'docs/'",
        "train/squamous.cell.carcinoma_left/1.png": "unknown class folder 'squamous.cell.carcinoma_left/'",
        "val/normal/x.png": "second folder for split 'valid': 'val/' beside 'valid/'",
        "train/normal/scan.tif": "unsupported type '.tif'",
        "train/normal/notes.txt": "unsupported type '.txt'",
        "train/normal/.DS_Store": "hidden or system file",
        "__MACOSX/train/normal/._a.png": "hidden or system file",
        "train/normal/Thumbs.db": "hidden or system file",
    }
    for rel in extra:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(synthetic_image("normal", 700 + len(rel)) if rel.endswith(".png") else b"x")
    good = synthetic_image("normal", 500, size=64)
    (root / "train" / "normal" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "normal" / "fake.png").write_text("not an image either")
    (root / "train" / "normal" / "nested").mkdir()
    (root / "train" / "normal" / "nested" / "deep.png").write_bytes(synthetic_image("normal", 901))

    report = build_dataset(root, tmp_path / "out")
    files_on_disk = sum(1 for p in root.rglob("*") if p.is_file())
    assert report["files"] == {"found": files_on_disk, "images": 51, "quarantined": 2, "ignored": len(extra)}
    f = report["files"]
    assert f["images"] + f["quarantined"] + f["ignored"] == f["found"]
    ignored = {i["path"]: i["reason"] for i in report["ignored"]}
    assert set(ignored) == set(extra)
    for rel, reason in extra.items():
        assert ignored[rel].startswith(reason), (rel, ignored[rel])
    assert report["ignored_classes"] == ["squamous.cell.carcinoma"]
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {"train/normal/truncated.png", "train/normal/fake.png"}
    assert "cannot decode" in reasons["train/normal/truncated.png"]
    for path in reasons:  # never lost: kept aside for a person to look at
        assert (tmp_path / "out" / "quarantine" / path).read_bytes() == (root / path).read_bytes()
    used = {r.path for r in records(tmp_path / "out")}
    assert "train/normal/nested/deep.png" in used, "subfolders of a class folder belong to the class"
    accounted = used | set(reasons) | set(ignored)
    assert accounted == {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    md = report_markdown(report)
    assert f"{files_on_disk} files** found: 51 images used, 2 quarantined, {len(extra)} ignored" in md


def test_the_canonical_split_folder_wins_over_an_alias(tmp_path):
    root = write_dataset(
        tmp_path / "d",
        {
            "train": {"adenocarcinoma": 6, "normal": 6},
            "validation": {"adenocarcinoma": 3, "normal": 3},
            "valid": {"adenocarcinoma": 2, "normal": 2},
        },
    )
    report = build_dataset(root, tmp_path / "out")
    assert report["counts"]["test"] == {"normal": 2, "adenocarcinoma": 2}
    assert Counter(i["reason"] for i in report["ignored"]) == {
        "second folder for split 'valid': 'validation/' beside 'valid/' (only 'valid/' is used)": 6
    }


def test_missing_class_folders(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    expected = r"no class folders for normal, adenocarcinoma \(found \['images', 'labels'\]\)"
    with pytest.raises(DatasetError, match=expected):
        build_dataset(root, tmp_path / "out")


def test_single_class(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": {"adenocarcinoma": 3, "normal": 3}, "valid": {"normal": 3}})
    expected = r"d/valid: only \['normal'\] present, missing class folder\(s\) \['adenocarcinoma'\]"
    with pytest.raises(DatasetError, match=expected):
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
    root = write_dataset(tmp_path / "d", {"": {"adenocarcinoma": 10, "normal": 2}})
    with pytest.raises(DatasetError, match="class 'normal' has 2 distinct picture.s. to draw from, needs at least 3"):
        build_dataset(root, tmp_path / "out")


@pytest.mark.parametrize("kwargs", [{"valid_fraction": 0.0}, {"test_fraction": 0.7}])
def test_bad_fractions(tmp_path, presplit_dataset, kwargs):
    with pytest.raises(DatasetError, match=f"{next(iter(kwargs))}=.*expected a fraction"):
        build_dataset(presplit_dataset, tmp_path / "out", **kwargs)


def test_report_lists_refused_source_objects_and_the_largest_groups(tmp_path, presplit_dataset):
    # Three copies of one training picture: the largest duplicate group, listed with its members.
    first = sorted((presplit_dataset / "train" / "normal").iterdir())[0]
    for n in (1, 2):
        shutil.copy(first, first.with_name(f"copy-{n}.png"))
    refused = [{"key": "data//etc/passwd", "reason": "absolute path after the prefix"}]
    report = build_dataset(presplit_dataset, tmp_path / "out", refused=refused, workers=0)

    assert report["refused_source_objects"] == refused
    assert (
        report["files"]["found"]
        == report["files"]["images"] + report["files"]["quarantined"] + report["files"]["ignored"]
    )  # refused objects were never files under the root
    top = report["largest_duplicate_groups"][0]
    assert top["size"] == 3 and top["distinct_files"] == 1
    assert set(top["examples"]) == {f"train/normal/{first.name}", "train/normal/copy-1.png", "train/normal/copy-2.png"}
    markdown = report_markdown(report)
    assert "Refused by the fetch (not downloaded): 1" in markdown and "data//etc/passwd" in markdown


def test_valid_images_are_copied_once_by_validation_and_match_the_source(tmp_path, presplit_dataset):
    build_dataset(presplit_dataset, tmp_path / "out", workers=0)
    manifest = Manifest.load(tmp_path / "out")
    for rec in manifest.records:
        assert (tmp_path / "out" / rec.stored_as).read_bytes() == (presplit_dataset / rec.path).read_bytes()
