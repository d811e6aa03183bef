"""Precision in training (chest_ct/precision.py), the golden set (chest_ct/golden.py) and the shared guard logic.

CPU feature detection is overridden with CHEST_CT_CPU_BF16 to play machines with and
without native bf16; GPU choices are tested on the compute capabilities TensorFlow would
report (no GPU here). Mixed precision itself runs for real on this CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from chest_ct import defaults
from chest_ct.determinism import seed_everything
from chest_ct.export import export_saved_model, read_metadata
from chest_ct.fitting import Examples, fit_classifier
from chest_ct.golden import KEEP_FLOAT32_OPS, encode_golden, pick_golden, write_golden_set
from chest_ct.ingest import build_dataset
from chest_ct.model import build_model, split_model
from chest_ct.ood import block_features, fit_guard
from chest_ct.precision import (
    FLOAT32,
    MIXED_BF16,
    MIXED_FP16,
    PrecisionChoice,
    choose_precision,
    conv_policy,
    gpu_policy,
    onednn_bf16,
    precision_agreement,
)
from chest_ct.predict import load_predictor
from chest_ct.records import TRAIN, VALID, Manifest
from serving.precision import CpuBf16, cpu_bf16, parity, serving_precision
from tests.conftest import write_dataset

SIZE = 32
NATIVE, NONE = CpuBf16(True, True, "test: native"), CpuBf16(False, True, "test: avx512f only")
ONEDNN_BF16 = cpu_bf16({}).runnable


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    root = write_dataset(
        tmp / "src",
        {
            "train": {"adenocarcinoma": 10, "normal": 10},
            "valid": {"adenocarcinoma": 4, "normal": 4},
            "test": {"adenocarcinoma": 4, "normal": 4},
        },
    )
    build_dataset(root, tmp / "out")
    return Manifest.load(tmp / "out")


# --- choosing -----------------------------------------------------------------------------------


def test_cpu_detection_reads_the_flags_and_the_override_wins(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bf16({}, info) == CpuBf16(True, True, f"{info}: avx512_bf16")
    info.write_text("flags\t\t: fpu avx2 avx512f amx_tile\n")
    assert cpu_bf16({}, info).native is False and cpu_bf16({}, info).runnable is True
    info.write_text("flags\t\t: fpu avx2\n")
    assert cpu_bf16({}, info) == CpuBf16(False, False, f"{info}: no avx512_bf16/amx_bf16")
    assert cpu_bf16({"CHEST_CT_CPU_BF16": "0"}, info).native is False
    assert cpu_bf16({"CHEST_CT_CPU_BF16": "1"}, info).native is True
    assert cpu_bf16({}, tmp_path / "absent").native is False
    with pytest.raises(ValueError, match="CHEST_CT_CPU_BF16='on': expected 0 or 1"):
        cpu_bf16({"CHEST_CT_CPU_BF16": "on"}, info)


def test_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    assert choose_precision("auto", gpus=[], cpu=NATIVE).policy == MIXED_BF16
    assert choose_precision("auto", gpus=[], cpu=NONE).policy == FLOAT32
    assert serving_precision("auto", NATIVE) == ("bf16", "auto: native bf16 (test: native)")
    assert serving_precision("auto", NONE)[0] == "fp32"
    # The override reaches the real detection, as on a machine without the flags.
    monkeypatch.setenv("CHEST_CT_CPU_BF16", "0")
    choice = choose_precision("auto", gpus=[])
    assert (choice.policy, choice.reason) == (FLOAT32, "auto: no native bf16 on this CPU (CHEST_CT_CPU_BF16=0)")
    monkeypatch.setenv("CHEST_CT_CPU_BF16", "1")
    assert choose_precision("auto", gpus=[]).policy == MIXED_BF16


def test_explicit_choices():
    assert choose_precision("fp32", gpus=[], cpu=NATIVE).policy == FLOAT32
    forced = choose_precision("bf16", gpus=[], cpu=NONE)
    assert forced.policy == MIXED_BF16 and "emulated" in forced.reason
    assert serving_precision("bf16", CpuBf16(False, False, "x"))[0] == "fp32", "oneDNN cannot run it at all"
    assert serving_precision("auto", NATIVE, gpus=1)[0] == "fp32"
    for bad in ("fp16", "BF16", ""):
        with pytest.raises(ValueError, match=f"precision={bad!r}: expected one of auto, fp32, bf16"):
            choose_precision(bad, gpus=[], cpu=NATIVE)


@pytest.mark.parametrize(
    "capabilities, requested, policy",
    [
        ([(8, 0)], "auto", MIXED_BF16),  # A100
        ([(9, 0), (9, 0)], "auto", MIXED_BF16),  # H100 x2
        ([(7, 5)], "auto", MIXED_FP16),  # T4
        ([(8, 6), (7, 0)], "auto", MIXED_FP16),  # the slowest GPU decides
        ([(6, 1)], "auto", FLOAT32),  # P4: no tensor cores
        ([(6, 1)], "bf16", MIXED_FP16),  # forced: the GPU's reduced type
        ([(8, 0)], "fp32", FLOAT32),
    ],
)
def test_gpu_policy_follows_the_compute_capability(capabilities, requested, policy):
    choice = choose_precision(requested, gpus=capabilities, cpu=NATIVE)
    assert choice.policy == policy and choice.device == f"{len(capabilities)} GPU(s)"
    assert choice.loss_scale == (policy == MIXED_FP16)
    assert gpu_policy(capabilities)[0] in (MIXED_BF16, MIXED_FP16, FLOAT32)


def test_the_server_and_the_export_use_the_same_tolerance():
    from serving.config import ServerConfig

    assert ServerConfig().precision_tolerance == defaults.PRECISION_TOLERANCE


# --- mixed precision in Keras -------------------------------------------------------------------


@pytest.mark.parametrize("policy, dtype", [(MIXED_FP16, "float16"), (MIXED_BF16, "bfloat16")])
def test_conv_policy_keeps_features_and_head_float32_and_is_undone(policy, dtype):
    seed_everything(4)
    model = build_model(SIZE, "none")
    base, head = split_model(model)
    x = np.random.default_rng(0).uniform(-100, 100, (3, SIZE, SIZE, 3)).astype(np.float32)
    before = model.predict(x, verbose=0)
    with conv_policy(base, policy, model):
        conv = base.get_layer("block3_conv1")
        assert conv.compute_dtype == dtype and conv.kernel.dtype == "float32"
        assert base.layers[-1].compute_dtype == "float32" and head.compute_dtype == "float32"
        features, probs = base.predict(x, verbose=0), model.predict(x, verbose=0)
        assert features.dtype == np.float32 and probs.dtype == np.float32
    assert not np.array_equal(probs, before), "the convolutions really ran in reduced precision"
    np.testing.assert_allclose(probs, before, atol=0.05)
    assert base.get_layer("block3_conv1").compute_dtype == "float32"
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)


def test_fine_tuning_in_mixed_float16_scales_the_loss_and_outputs_float32(manifest, monkeypatch):
    """What a T4 gets (mixed_float16), run on this CPU: float32 variables, loss scaling, float32 probabilities."""
    from chest_ct import fitting

    t4 = PrecisionChoice("auto", MIXED_FP16, "1 GPU(s)", "test: a T4's choice")
    monkeypatch.setattr(fitting, "choose_precision", lambda requested: t4)
    seed_everything(2)
    model = build_model(SIZE, "none")
    seen = {}

    def on_epoch(epoch, logs):
        if "ft_loss" in logs:
            base, _ = split_model(model)
            seen.update(
                optimizer=type(model.optimizer).__name__,
                conv=base.get_layer("block5_conv1").compute_dtype,
                output=model(np.zeros((1, SIZE, SIZE, 3), np.float32)).dtype,
                loss=logs["ft_loss"],
            )

    result = fit_classifier(
        model,
        Examples.of_role(manifest, TRAIN),
        Examples.of_role(manifest, VALID),
        epochs=1,
        batch_size=8,
        fine_tune_epochs=1,
        fine_tune_learning_rate=1e-4,
        on_epoch=on_epoch,
    )
    assert seen["optimizer"] == "LossScaleOptimizer" and seen["conv"] == "float16"
    assert seen["output"] == tf.float32 and np.isfinite(seen["loss"])
    assert result.precision == t4 and all(w.dtype == "float32" for w in model.weights)
    assert split_model(model)[0].get_layer("block5_conv1").compute_dtype == "float32", "exported in float32"


def test_bf16_features_are_close_to_fp32(manifest):
    def run(precision):
        seed_everything(1)
        return fit_classifier(
            build_model(SIZE, "none"),
            Examples.of_role(manifest, TRAIN),
            Examples.of_role(manifest, VALID),
            epochs=2,
            batch_size=8,
            precision=precision,
        )

    fp32, bf16 = run("fp32"), run("bf16")
    assert (fp32.precision.policy, bf16.precision.policy) == (FLOAT32, MIXED_BF16)
    rel = np.abs(bf16.features.train - fp32.features.train).mean() / np.abs(fp32.features.train).mean()
    assert 0 < rel < 0.02, rel


# --- the golden set and agreement ----------------------------------------------------------------


def test_pick_golden_spreads_over_both_classes_one_per_picture_clear_of_the_threshold():
    probs = [0.05, 0.10, 0.10, 0.49, 0.51, 0.30, 0.95, 0.80, 0.60, 0.52, 0.99, 0.70]
    labels = [0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1]
    groups = [1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    picked = pick_golden(probs, labels, groups, threshold=0.5, count=6, margin=0.02)
    assert sorted(labels[i] for i in picked) == [0, 0, 0, 1, 1, 1]
    assert all(abs(probs[i] - 0.5) > 0.02 for i in picked), "0.49, 0.51 and 0.52 sit too close to the threshold"
    assert len({groups[i] for i in picked}) == len(picked)
    assert min(probs[i] for i in picked) == 0.05 and max(probs[i] for i in picked) == 0.99, "the extremes included"
    assert pick_golden([0.5, 0.5], [0, 1], [1, 2], 0.5) == []


def test_parity_counts_flips_at_the_threshold_and_never_trusts_nan():
    check = parity([0.2, 0.6, 0.7], [0.21, 0.59, 0.7], threshold=0.595, tolerance=0.01)
    assert check.label_flips == 1 and check.max_abs_diff == pytest.approx(0.01) and not check.ok
    assert parity([0.2, 0.7], [0.205, 0.699], 0.5, 0.01).ok
    assert not parity([0.2], [float("nan")], 0.5, 0.01).ok
    assert not parity([], [], 0.5, 0.01).ok
    with pytest.raises(ValueError, match="2 reduced-precision probabilities for 1 reference"):
        parity([0.1], [0.1, 0.2], 0.5, 0.01)


@pytest.fixture(scope="module")
def golden_export(manifest, tmp_path_factory):
    seed_everything(5)
    model = build_model(SIZE, "none")
    files, _ = manifest.files_and_labels(TRAIN)
    guard = fit_guard(block_features(model, files, SIZE, 8), [r.group for r in manifest.role(TRAIN)])
    out = export_saved_model(model, tmp_path_factory.mktemp("golden") / "model", {}, guard=guard)
    entry = write_golden_set(out, encode_golden(files[:4], SIZE), "four training images")
    return out, entry


def test_the_golden_set_holds_the_exported_graphs_float32_answers(golden_export):
    out, entry = golden_export
    assert read_metadata(out)["precision_guard"] == entry
    assert entry["golden_images"] == [f"golden/0{i}.png" for i in range(4)]
    assert entry["keep_float32_ops"] == list(KEEP_FLOAT32_OPS) and entry["source"] == "four training images"
    stored = [(out / name).read_bytes() for name in entry["golden_images"]]
    assert all(img.startswith(b"\x89PNG") for img in stored)
    assert tf.io.decode_png(stored[0]).shape == (SIZE, SIZE, 3), "re-encoded at the model's input size"
    np.testing.assert_array_equal(load_predictor(out)(stored), np.asarray(entry["fp32_probabilities"], np.float32))
    from serving.model_dir import read_model_info

    info = read_model_info(out)
    assert info.golden is not None and info.golden.probabilities == tuple(entry["fp32_probabilities"])


@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN cannot run bf16 on this CPU (no avx512f)")
def test_agreement_on_a_split_and_the_grappler_rewrite_is_scoped(golden_export, manifest):
    out, _ = golden_export
    files, _ = manifest.files_and_labels(VALID)
    encoded = [Path(f).read_bytes() for f in files]
    before = load_predictor(out)(encoded)
    report = precision_agreement(out, files, threshold=0.5)
    assert report["images"] == len(files) and report["precision"] == "bf16"
    assert 0 < report["max_abs_diff"] <= 0.01 and report["label_flips"] == 0 and report["within_tolerance"]
    assert not precision_agreement(out, files, threshold=0.5, tolerance=0.0)["within_tolerance"]
    after = load_predictor(out)(encoded)
    np.testing.assert_array_equal(after, before)  # float32 again once the block is left
    with onednn_bf16(KEEP_FLOAT32_OPS):
        rounded = load_predictor(out)(encoded)
    assert not np.array_equal(rounded, before)


# --- the train step ------------------------------------------------------------------------------


@pytest.mark.parametrize("cpu_flag, used", [("0", FLOAT32), ("1", MIXED_BF16)])
def test_the_train_step_records_its_precision_and_a_golden_set(
    manifest, tmp_path, mlflow_sqlite, monkeypatch, cpu_flag, used
):
    from mlflow import MlflowClient

    from chest_ct.train import train_and_export

    monkeypatch.setenv("CHEST_CT_CPU_BF16", cpu_flag)
    seed_everything(3)
    build_model(SIZE, "none").save(tmp_path / "base.keras")
    run_id = train_and_export(
        manifest.root,
        tmp_path / "base.keras",
        tmp_path / "out",
        epochs=2,
        batch_size=8,
        seed=3,
        threshold_folds=3,
        target_sensitivity=0.9,
    )
    run = MlflowClient().get_run(run_id)
    assert run.data.params["precision"] == "auto" and run.data.params["precision_used"] == used
    assert run.data.params["precision_device"] == "CPU" and run.data.params["replicas"] == "1"
    assert f"CHEST_CT_CPU_BF16={cpu_flag}" in run.data.tags["precision_reason"]
    meta = read_metadata(tmp_path / "out")
    assert meta["training"]["precision"] == {
        "requested": "auto",
        "policy": used,
        "device": "CPU",
        "reason": run.data.tags["precision_reason"],
    }
    guard = meta["precision_guard"]
    assert 2 <= len(guard["golden_images"]) <= defaults.GOLDEN_IMAGES
    assert all((tmp_path / "out" / name).is_file() for name in guard["golden_images"])
    assert all(abs(p - meta["threshold"]) > defaults.PRECISION_TOLERANCE for p in guard["fp32_probabilities"])
    fitting = [manifest.file(r) for r in manifest.records if r.split in (TRAIN, VALID)]
    encoded = set(encode_golden(fitting, SIZE))
    assert all((tmp_path / "out" / name).read_bytes() in encoded for name in guard["golden_images"]), (
        "golden images come from the fitting data only"
    )
    if cpu_flag == "1":  # evaluation reports how bf16 answers differ on its split, and keeps the golden set
        from chest_ct.blessing import BlessingPolicy
        from chest_ct.evaluate import evaluate_model

        result = evaluate_model(
            tmp_path / "out",
            manifest.root,
            tmp_path / "evaluated",
            tmp_path / "plots",
            run_id=run_id,
            policy=BlessingPolicy(min_auc=0, min_sensitivity=0, min_specificity=0),
        )
        agreement = read_metadata(tmp_path / "evaluated")["evaluation"]["precision_agreement"]
        assert agreement == result.report["precision_agreement"]
        assert agreement["images"] == result.report["scored_images"] and agreement["precision"] == "bf16"
        assert agreement["within_tolerance"] and agreement["label_flips"] == 0 and agreement["tolerance"] == 0.01
        assert (tmp_path / "evaluated" / guard["golden_images"][0]).is_file()


def test_a_bad_precision_is_refused_before_training(manifest):
    with pytest.raises(ValueError, match="precision='half': expected one of auto, fp32, bf16"):
        fit_classifier(
            build_model(SIZE, "none"),
            Examples.of_role(manifest, TRAIN),
            Examples.of_role(manifest, VALID),
            precision="half",
        )


def test_the_pipeline_passes_precision_to_the_train_step():
    import yaml

    spec = next(
        yaml.safe_load_all((Path(__file__).resolve().parents[1] / "pipelines" / "chest_ct_pipeline.yaml").read_text())
    )
    assert spec["root"]["inputDefinitions"]["parameters"]["precision"]["defaultValue"] == defaults.PRECISION
    train = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["precision"]
    assert train == {"componentInputParameter": "precision"}
    source = "\n".join(spec["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
    assert "precision=precision" in source
