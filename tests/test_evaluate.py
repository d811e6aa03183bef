import math
import shutil

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from chest_ct.blessing import BlessingPolicy, decide
from chest_ct.determinism import seed_everything
from chest_ct.evaluate import evaluate_model, summary_markdown
from chest_ct.export import export_saved_model, read_metadata
from chest_ct.fitting import Examples, fit_classifier
from chest_ct.images import ImageInfo
from chest_ct.ingest import build_dataset
from chest_ct.metrics import by_group, calibration, classification_metrics
from chest_ct.model import build_model, split_model
from chest_ct.ood import block_features, fit_guard
from chest_ct.records import TEST, TRAIN, VALID, ImageRecord, Manifest
from chest_ct.registry import promote_if_unchanged
from chest_ct.scoring import Comparison
from chest_ct.seen_images import read_seen, split_unseen, write_seen
from chest_ct.shortcut import shortcut_audit
from chest_ct.threshold import choose_threshold, out_of_fold_threshold
from tests.conftest import write_dataset

Y = [0, 0, 1, 1, 1, 1]
P = [0.1, 0.4, 0.35, 0.8, 0.9, 0.95]


def test_threshold_is_the_highest_that_reaches_the_target():
    assert choose_threshold(Y, P, 0.75) == pytest.approx(0.8)
    assert choose_threshold(Y, P, 1.0) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="target_sensitivity=1.5"):
        choose_threshold(Y, P, 1.5)


def test_classification_metrics_by_hand():
    m = classification_metrics(Y, P, 0.38)  # predicted positive: .4 .8 .9 .95 -> tp 3, fp 1, fn 1, tn 1
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(0.75) and m["roc_auc"] == pytest.approx(7 / 8)
    expected_loss = -np.mean([math.log(v) for v in (0.9, 0.6, 0.35, 0.8, 0.9, 0.95)])
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["brier"] == pytest.approx(np.mean((np.array(P) - np.array(Y)) ** 2))


def test_by_group_counts_each_picture_once():
    y, p, ids = by_group([0, 0, 0, 1, 1], [0.1, 0.3, 0.8, 0.9, 0.5], [7, 7, 3, 5, 5])
    assert ids.tolist() == [3, 5, 7] and y.tolist() == [0, 1, 0]
    assert p.tolist() == pytest.approx([0.8, 0.7, 0.2])
    with pytest.raises(ValueError, match="both labels"):
        by_group([0, 1], [0.1, 0.2], [1, 1])


def test_calibration_by_hand():
    perfect = calibration([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0])
    assert perfect["brier"] == 0.0 and perfect["ece"] == 0.0
    overconfident = calibration([0, 0, 1, 1], [0.9, 0.9, 0.9, 0.9])
    assert overconfident["brier"] == pytest.approx((0.81 * 2 + 0.01 * 2) / 4)
    assert overconfident["ece"] == pytest.approx(0.4)
    assert overconfident["reliability"] == {"mean_predicted": [0.9], "fraction_positive": [0.5]}


def grouped_data(pos_groups: int, neg_groups: int, copies: int = 3):
    """Labels and groups with copies of each picture, and a predictor that separates the classes noisily."""
    labels, groups = [], []
    for g in range(pos_groups + neg_groups):
        labels += [int(g < pos_groups)] * copies
        groups += [g] * copies
    return np.array(labels), np.array(groups)


def test_out_of_fold_threshold_holds_whole_groups_out():
    y, g = grouped_data(12, 10)
    calls = []
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.15, g.max() + 1)

    def fit_predict(fit_idx, held_idx):
        calls.append((fit_idx, held_idx))
        return np.clip(0.3 + 0.4 * y[held_idx] + noise[g[held_idx]], 0, 1)

    choice = out_of_fold_threshold(
        y, g, fit_predict, target_sensitivity=0.9, folds=5, seed=3, class_names=("normal", "adenocarcinoma")
    )
    assert len(calls) == choice.folds == 5
    for fit_idx, held_idx in calls:
        assert not set(g[fit_idx]) & set(g[held_idx]), "a picture is never on both sides of a fold"
    assert sorted(np.concatenate([h for _, h in calls]).tolist()) == list(range(len(y))), "each image once"
    yg = np.array([int(i < 12) for i in range(22)])
    pg = np.clip(0.3 + 0.4 * yg + noise, 0, 1)
    assert choice.threshold == pytest.approx(choose_threshold(yg, pg, 0.9)), "chosen per picture, pooled over folds"
    assert choice.oof_sensitivity_where_chosen >= 0.9
    assert choice.groups_per_class == {"normal": 10, "adenocarcinoma": 12}
    assert len(choice.fold_thresholds) == 5 and choice.spread >= 0
    assert len(choice.fold_metrics) == 5 and sum(m["groups"] for m in choice.fold_metrics) == 22
    assert set(choice.calibration) == {"per_image", "per_group"} and choice.calibration["per_group"]["n"] == 22
    assert choice.source().startswith("out-of-fold: 5-fold grouped CV over 66 fitting images (22 pictures)")


def test_out_of_fold_folds_are_limited_by_the_rarest_class():
    y, g = grouped_data(8, 3)
    choice = out_of_fold_threshold(y, g, lambda fit, held: y[held] * 0.5 + 0.25, folds=5)
    assert choice.folds == 3 and "5 folds asked, 3 possible" in choice.note
    y, g = grouped_data(8, 1)
    with pytest.raises(ValueError, match="each class needs at least 2"):
        out_of_fold_threshold(y, g, lambda fit, held: y[held] * 1.0, folds=5)
    with pytest.raises(ValueError, match="threshold_folds=1"):
        out_of_fold_threshold(y, g, lambda fit, held: y[held] * 1.0, folds=1)


def info(**kw) -> ImageInfo:
    base = dict(
        sha256="0" * 64,
        phash="0" * 16,
        format="PNG",
        mode="RGB",
        width=512,
        height=512,
        brightness_mean=100.0,
        brightness_std=40.0,
    )
    return ImageInfo(**{**base, **kw})


def stats_records(n: int, rng, brightness_by_label: bool) -> list[ImageRecord]:
    out = []
    for i in range(n):
        label = "adenocarcinoma" if i % 2 else "normal"
        bright = (150 if label == "adenocarcinoma" else 60) if brightness_by_label else 100
        out.append(
            ImageRecord(
                f"{i}.png",
                "train",
                label,
                info(brightness_mean=bright + rng.normal(0, 5), brightness_std=rng.normal(40, 5)),
            )
        )
    return out


def test_shortcut_audit_warns_when_statistics_predict_the_label():
    rng = np.random.default_rng(0)
    audit = shortcut_audit(stats_records(40, rng, True), stats_records(20, rng, True), "adenocarcinoma", 0.97)
    assert audit["warning"] and audit["statistics_auc"] > 0.95
    assert audit["message"].startswith("SHORTCUT WARNING") and audit["single_feature_auc"]["brightness_mean"] > 0.95


def test_shortcut_audit_is_quiet_when_statistics_are_uninformative():
    rng = np.random.default_rng(0)
    audit = shortcut_audit(stats_records(40, rng, False), stats_records(40, rng, False), "adenocarcinoma", 0.97)
    assert not audit["warning"] and audit["statistics_auc"] < 0.8


GOOD = {"roc_auc": 0.9, "sensitivity": 0.95, "specificity": 0.7}


def compared(challenger_auc: float, champion_auc: float, normal: int = 10, cancer: int = 10) -> Comparison:
    return Comparison(
        "3",
        images=40,
        groups_per_class={"normal": normal, "adenocarcinoma": cancer},
        challenger_auc=challenger_auc,
        champion_auc=champion_auc,
    )


def test_blessing_floors_are_per_group():
    policy = BlessingPolicy()
    assert decide(GOOD, policy, None).blessed
    assert decide(GOOD, policy, None).reasons == ["no champion yet: decided by the floors"]
    low = decide({**GOOD, "specificity": 0.4}, policy, None)
    assert not low.blessed and low.failures == ["per-group specificity 0.4000 is below the floor 0.5000"]
    assert not decide({**GOOD, "roc_auc": float("nan")}, policy, None).blessed, "an undefined AUC never passes"


def test_blessing_against_the_champion():
    policy = BlessingPolicy(max_auc_drop=0.01, min_compare_per_class=5)
    worse = decide(GOOD, policy, compared(0.90, 0.95))
    assert not worse.blessed and "regresses by more than the allowed 0.01" in worse.failures[0]
    assert "champion version 3's 0.9500 on 40 test images (20 pictures) neither model saw" in worse.failures[0]
    assert decide(GOOD, policy, compared(0.945, 0.95)).blessed, "within the allowed drop"


def test_too_few_unseen_pictures_make_the_comparison_inconclusive():
    policy = BlessingPolicy(min_compare_per_class=5)
    decision = decide(GOOD, policy, compared(0.5, 0.99, normal=4))
    assert decision.blessed, "decided by the floors alone"
    assert decision.reasons == [
        "champion comparison inconclusive (only 4 normal, 10 adenocarcinoma test pictures "
        "are unseen by both models (need 5 per class)): decided by the floors alone"
    ]
    assert not decide({**GOOD, "sensitivity": 0.5}, policy, compared(0.5, 0.99, normal=4)).blessed
    legacy = decide(GOOD, policy, Comparison("3", unavailable="champion version 3 carries no record"))
    assert legacy.blessed and "inconclusive (champion version 3 carries no record)" in legacy.reasons[0]
    broken = decide(GOOD, policy, Comparison("3", error="cannot score champion version 3"))
    assert not broken.blessed and broken.failures == ["cannot score champion version 3"]


@pytest.mark.parametrize(
    "kwargs, message", [({"min_auc": 1.5}, "min_auc=1.5"), ({"min_compare_per_class": 0}, "min_compare_per_class=0")]
)
def test_bad_policy(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlessingPolicy(**kwargs)


def test_copies_of_seen_images_are_not_unseen(tmp_path, presplit_dataset):
    build_dataset(presplit_dataset, tmp_path / "data")
    manifest = Manifest.load(tmp_path / "data")
    train, test = manifest.role(TRAIN), manifest.role(TEST)
    (tmp_path / "m").mkdir()
    summary = write_seen(tmp_path / "m", train + test[:2])
    assert summary["count"] == len(train) + 2 and summary["file"] == "fitted_images.json"
    assert {s.split for s in read_seen(tmp_path / "m")} == {TRAIN, TEST}
    near = ImageRecord("x/near.png", "test", train[0].label, info(sha256="f" * 64, phash=flip_bit(train[0].phash)))
    kept, excluded = split_unseen([*test, near], read_seen(tmp_path / "m"))
    assert [r.path for r in kept] == [r.path for r in test[2:]]
    assert excluded == {
        test[0].path: "same file as an image it saw in test",
        test[1].path: "same file as an image it saw in test",
        "x/near.png": "near copy of an image it saw in train",
    }
    assert split_unseen(test, []) == (test, {})
    assert read_seen(tmp_path) is None, "a model from before the record: unknown, not empty"


def flip_bit(phash: str) -> str:
    return f"{int(phash, 16) ^ 1:016x}"


def test_promotion_rechecks_the_champion_right_before_setting_it(mlflow_sqlite):
    client = MlflowClient()
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source="file:///nowhere")
    assert promote_if_unchanged("m", "1", None) == ""
    # Two overlapping runs both compared against version 1; the first to finish promotes...
    assert promote_if_unchanged("m", "2", "1") == ""
    # ...the second sees the alias moved and stands down.
    why = promote_if_unchanged("m", "3", "1")
    assert why.startswith("champion changed during evaluation (compared against 1, now version 2): not promoted")
    assert client.get_model_version_by_alias("m", "champion").version == 2
    assert "compared against no champion" in promote_if_unchanged("m", "3", None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained model and its mirror image (1 - p), each with its record of fitted images."""
    tmp = tmp_path_factory.mktemp("eval")
    root = write_dataset(
        tmp / "src",
        {
            "train": {"adenocarcinoma": 10, "normal": 10},
            "valid": {"adenocarcinoma": 4, "normal": 4},
            "test": {"adenocarcinoma": 5, "normal": 5},
        },
    )
    build_dataset(root, tmp / "data")
    manifest = Manifest.load(tmp / "data")
    seed_everything(0)
    model = build_model(32, "none")
    fit_classifier(model, Examples.of_role(manifest, TRAIN), Examples.of_role(manifest, VALID), epochs=3, batch_size=8)
    fitted = manifest.role(TRAIN) + manifest.role(VALID)
    guard = fit_guard(block_features(model, [manifest.file(r) for r in fitted], 32, 8), [r.group for r in fitted])
    a = export_saved_model(model, tmp / "a", {"threshold": 0.5}, guard=guard)
    _, head = split_model(model)
    kernel, bias = head.get_weights()
    head.set_weights([-kernel, -bias])
    b = export_saved_model(model, tmp / "b", {"threshold": 0.5}, guard=guard)
    for d in (a, b):
        write_seen(d, fitted)
    from sklearn.metrics import roc_auc_score

    from chest_ct.predict import predict_files

    files, y = manifest.files_and_labels(TEST)
    auc_a = roc_auc_score(y, predict_files(a, files))
    assert auc_a != 0.5
    better, worse = (a, b) if auc_a > 0.5 else (b, a)
    return tmp / "data", better, worse


def new_run() -> str:
    mlflow.set_experiment("chest-ct")
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


NO_FLOORS = BlessingPolicy(min_auc=0.0, min_sensitivity=0.0, min_specificity=0.0, min_compare_per_class=5)


def test_evaluate_scores_registers_and_blesses(models, tmp_path, mlflow_sqlite):
    data, better, _ = models
    run = new_run()
    result = evaluate_model(better, data, tmp_path / "m1", tmp_path / "p1", run_id=run, policy=NO_FLOORS)
    assert result.blessed and result.reasons == ["no champion yet: decided by the floors"]
    assert result.model_version == "1"
    client = MlflowClient()
    assert client.get_model_version_by_alias("chest-ct", "champion").version == 1
    assert client.get_model_version_by_alias("chest-ct", "candidate").version == 1
    r = result.report
    assert (r["scored_images"], r["scored_groups"], r["excluded_images"]) == (10, 10, 0)
    assert r["groups_per_class"] == {"normal": 5, "adenocarcinoma": 5}
    assert r["threshold"] == 0.5, "evaluate scores at the threshold train chose; it never picks one on test"
    assert set(r["per_group"]) >= {"roc_auc", "sensitivity", "specificity", "brier", "tp"}
    meta = read_metadata(tmp_path / "m1")
    assert meta["mlflow_run_id"] == run and meta["threshold"] == 0.5
    assert meta["evaluation"]["per_group"] == r["per_group"] and meta["evaluation"]["scored_groups"] == 10
    assert (tmp_path / "m1" / "fitted_images.json").is_file(), "the record travels with the model"
    metrics = client.get_run(run).data.metrics
    assert metrics["test_group_roc_auc"] == pytest.approx(r["per_group"]["roc_auc"])
    assert metrics["test_image_roc_auc"] == pytest.approx(r["per_image"]["roc_auc"])
    assert metrics["scored_images"] == 10 and metrics["excluded_images"] == 0
    assert not any("valid_sensitivity" in name for name in metrics), "a number that meets its target by construction"
    assert client.get_run(run).data.tags["blessed"] == "true"
    artifacts = {a.path for a in client.list_artifacts(run, "plots")}
    assert artifacts == {
        "plots/confusion_matrix_per_group.png",
        "plots/confusion_matrix_per_image.png",
        "plots/roc_curve.png",
        "plots/precision_recall_curve.png",
        "plots/calibration.png",
    }
    assert {"evaluation/report.json", "evaluation/blessing.json", "evaluation/shortcut_audit.json"} <= {
        a.path for a in client.list_artifacts(run, "evaluation")
    }
    assert "saved_model/fitted_images.json" in {a.path for a in client.list_artifacts(run, "saved_model")}
    md = summary_markdown(result)
    assert "Scored **10 test images (10 duplicate groups: 5 normal, 5 adenocarcinoma)**" in md
    assert "| per group |" in md and "| per image |" in md


def test_champion_is_compared_only_on_pictures_neither_model_saw(models, tmp_path, mlflow_sqlite):
    data, better, worse = models
    manifest = Manifest.load(data)
    test = manifest.role(TEST)
    normals = [r for r in test if r.label == "normal"]
    # A champion from another split: it was fitted on two of today's normal test images and one cancer image.
    seen_by_champion = normals[:2] + [r for r in test if r.label == "adenocarcinoma"][:1]
    champ = tmp_path / "champion"
    shutil.copytree(better, champ)
    write_seen(champ, manifest.role(TRAIN) + manifest.role(VALID) + seen_by_champion)
    first = evaluate_model(champ, data, tmp_path / "m1", tmp_path / "p1", run_id=new_run(), policy=NO_FLOORS)
    assert first.blessed
    assert first.report["scored_images"] == 7, "not even the champion is scored on what it saw"
    assert {e["path"] for e in first.report["excluded"]} == {r.path for r in seen_by_champion}
    assert all(e["reason"].endswith("(this model's record)") for e in first.report["excluded"])

    second = evaluate_model(better, data, tmp_path / "m2", tmp_path / "p2", run_id=new_run(), policy=NO_FLOORS)
    champion = second.report["champion"]
    assert champion["champion_version"] == "1" and champion["images"] == 7
    assert set(champion["excluded_as_seen_by_champion"]) == {r.path for r in seen_by_champion}
    assert champion["groups_per_class"] == {"normal": 3, "adenocarcinoma": 4}
    assert second.blessed, "inconclusive: the floors decide"
    assert any(
        r.startswith("champion comparison inconclusive (only 3 normal, 4 adenocarcinoma test pictures")
        for r in second.reasons
    )
    assert second.report["scored_images"] == 10, "the challenger itself is scored on all it did not see"

    third = evaluate_model(
        worse,
        data,
        tmp_path / "m3",
        tmp_path / "p3",
        run_id=new_run(),
        policy=BlessingPolicy(0, 0, 0, min_compare_per_class=5),
    )
    assert third.report["champion"]["images"] == 10 and not third.blessed
    assert "regresses by more than the allowed 0.01" in third.reasons[0]
    client = MlflowClient()
    assert client.get_model_version_by_alias("chest-ct", "champion").version == 2
    assert client.get_model_version_by_alias("chest-ct", "candidate").version == 3
    assert client.get_run(client.get_model_version("chest-ct", "3").run_id).data.tags["blessed"] == "false"


def test_floors_broken_and_legacy_champions(models, tmp_path, mlflow_sqlite):
    data, better, _ = models
    strict = evaluate_model(
        better, data, tmp_path / "m1", tmp_path / "p1", run_id=new_run(), policy=BlessingPolicy(1.0, 1.0, 1.0)
    )
    assert not strict.blessed and any("below the floor" in r for r in strict.reasons)
    client = MlflowClient()
    bogus = client.create_model_version("chest-ct", source="file:///no/such/model", run_id=None)
    client.set_registered_model_alias("chest-ct", "champion", bogus.version)
    blocked = evaluate_model(better, data, tmp_path / "m2", tmp_path / "p2", run_id=new_run(), policy=NO_FLOORS)
    assert not blocked.blessed and any(
        r.startswith(f"cannot score champion version {bogus.version}") for r in blocked.reasons
    )
    assert client.get_model_version_by_alias("chest-ct", "champion").version == bogus.version

    legacy = tmp_path / "legacy"
    shutil.copytree(better, legacy)
    (legacy / "fitted_images.json").unlink()
    old = client.create_model_version("chest-ct", source=str(legacy), run_id=None)
    client.set_registered_model_alias("chest-ct", "champion", old.version)
    result = evaluate_model(better, data, tmp_path / "m3", tmp_path / "p3", run_id=new_run(), policy=NO_FLOORS)
    assert result.blessed and "carries no record of the images it was trained on" in result.reasons[0]
    with pytest.raises(ValueError, match="no record of the images this model was fitted on"):
        evaluate_model(legacy, data, tmp_path / "m4", tmp_path / "p4", run_id=new_run(), policy=NO_FLOORS)
