"""The server's precision setting and the golden-set guard, on the real server over loopback.

Each test starts ``python -m serving`` (tests/serving_helpers.py) and reads what it
reports in the model's v2 metadata, its log and its answers. CPU feature detection
is overridden with CHEST_CT_CPU_BF16 to play a machine with or without native bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests

from serving.precision import ONEDNN_BF16_FLAG
from tests.serving_helpers import (
    MODEL_NAME,
    InProcessModel,
    ServerProcess,
    b64,
    encode,
    exported_model,
    golden_model,
    rgb,
    run_server_expecting_failure,
)

#: oneDNN can run bf16 here, so a bf16 server's answers really differ from float32 ones.
ONEDNN_BF16 = ONEDNN_BF16_FLAG in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
IMAGES = [encode(rgb(40 + 4 * i, 36 + 6 * i, seed=50 + i)) for i in range(5)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "serving"


@pytest.fixture(scope="module")
def golden_dir(root) -> Path:
    return golden_model(str(root))


@pytest.fixture(scope="module")
def fp32_answers(golden_dir) -> np.ndarray:
    return InProcessModel(golden_dir).images(IMAGES)


def serve(model_dir: Path, tmp_path: Path, *args: str, cpu_bf16: str | None = None):
    """(metadata parameters, probabilities for IMAGES, server log) of a server started with ``args``."""
    server = ServerProcess(
        model_dir, tmp_path / "server.log", *args, env={"CHEST_CT_CPU_BF16": cpu_bf16} if cpu_bf16 is not None else None
    )
    try:
        server.wait_ready()
        params = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()["parameters"]
        body = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(IMAGES)], "data": [b64(i) for i in IMAGES]}]
        }
        reply = requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        return params, np.asarray(outputs["probability"], np.float32), server.log(tail=0)
    finally:
        server.stop()


def test_auto_on_a_cpu_without_native_bf16_serves_fp32(golden_dir, fp32_answers, tmp_path):
    params, probs, log = serve(golden_dir, tmp_path, cpu_bf16="0")
    assert params["precision"] == "fp32" and params["precision_requested"] == "auto"
    assert params["precision_reason"] == "auto: no native bf16 on this CPU (CHEST_CT_CPU_BF16=0)"
    assert params["precision_fell_back"] is False and "golden_images" not in params, "no reason to run the guard"
    np.testing.assert_allclose(probs, fp32_answers, atol=1e-5)
    assert "Precision fp32: auto: no native bf16" in log


def test_auto_with_native_bf16_serves_bf16_once_the_golden_set_agrees(golden_dir, fp32_answers, tmp_path):
    params, probs, log = serve(golden_dir, tmp_path, cpu_bf16="1")
    assert params["precision"] == "bf16" and params["precision_fell_back"] is False, params
    assert params["golden_images"] == 6 and params["golden_label_flips"] == 0
    assert params["golden_max_abs_diff"] <= params["golden_tolerance"] == 0.01
    assert "golden set agrees" in params["precision_reason"] and "Precision bf16" in log
    assert np.abs(probs - fp32_answers).max() <= 0.01
    if ONEDNN_BF16:
        assert np.abs(probs - fp32_answers).max() > 0, "the bf16 rewrite must actually be in effect"
        assert params["golden_max_abs_diff"] > 0


def test_a_tampered_golden_set_makes_the_server_fall_back_to_fp32(golden_dir, fp32_answers, tmp_path):
    tampered = tmp_path / "model"
    shutil.copytree(golden_dir, tampered)
    meta_path = tampered / "model_metadata.json"
    meta = json.loads(meta_path.read_text())
    stored = meta["precision_guard"]["fp32_probabilities"]
    stored[2] = 0.9 if stored[2] < 0.5 else 0.1  # far off, and across the threshold
    meta_path.write_text(json.dumps(meta))
    params, probs, log = serve(tampered, tmp_path, "--precision", "bf16")
    assert params["precision"] == "fp32" and params["precision_fell_back"] is True
    assert "the golden set disagrees in bf16" in params["precision_reason"]
    assert params["golden_label_flips"] >= 1 and params["golden_max_abs_diff"] > 0.3
    np.testing.assert_allclose(probs, fp32_answers, atol=1e-5)  # really float32 again
    warning = [line for line in log.splitlines() if "Precision fp32" in line]
    assert warning and "WARNING" in warning[0] and "golden set disagrees" in warning[0]


@pytest.mark.skipif(not ONEDNN_BF16, reason=f"oneDNN cannot run bf16 on this CPU (no {ONEDNN_BF16_FLAG})")
def test_a_zero_tolerance_refuses_any_difference(golden_dir, fp32_answers, tmp_path):
    params, probs, _ = serve(golden_dir, tmp_path, "--precision_tolerance", "0", cpu_bf16="1")
    assert params["precision"] == "fp32" and params["precision_fell_back"] is True
    assert params["golden_tolerance"] == 0 and params["golden_max_abs_diff"] > 0
    np.testing.assert_allclose(probs, fp32_answers, atol=1e-5)


def test_a_model_without_golden_set_is_never_served_in_bf16(root, tmp_path):
    plain = exported_model(str(root))
    params, probs, _ = serve(plain, tmp_path, "--precision", "bf16")
    assert params["precision"] == "fp32" and params["precision_fell_back"] is True
    assert "the model has no golden set" in params["precision_reason"]
    np.testing.assert_allclose(probs, InProcessModel(plain).images(IMAGES), atol=1e-5)


def test_a_missing_golden_image_is_reported_not_fatal(golden_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(golden_dir, broken)
    (broken / "golden" / "01.png").unlink()
    params, _, _ = serve(broken, tmp_path, "--precision", "bf16")
    assert params["precision"] == "fp32" and "golden image 'golden/01.png' is missing" in params["precision_reason"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--precision", "fp16"], {}, "precision='fp16' (allowed: auto, fp32, bf16)"),
        ([], {"CHEST_CT_PRECISION": "half"}, "precision='half' (allowed: auto, fp32, bf16)"),
        (["--precision_tolerance", "2"], {}, "precision_tolerance=2.0"),
        ([], {"CHEST_CT_CPU_BF16": "yes"}, "CHEST_CT_CPU_BF16='yes': expected 0 or 1"),
    ],
    ids=["flag", "env", "tolerance", "cpu-override"],
)
def test_bad_precision_settings_stop_the_server_with_one_line(golden_dir, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc = run_server_expecting_failure(golden_dir, *args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_precision_is_a_flag_with_an_environment_default(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["serving"])
    from serving.__main__ import build_parser
    from serving.config import from_args

    assert from_args(build_parser().parse_args([])).precision == "auto"
    monkeypatch.setenv("CHEST_CT_PRECISION", "fp32")
    monkeypatch.setenv("CHEST_CT_PRECISION_TOLERANCE", "0.002")
    config = from_args(build_parser().parse_args([]))
    assert (config.precision, config.precision_tolerance) == ("fp32", 0.002)
    assert from_args(build_parser().parse_args(["--precision", "bf16"])).precision == "bf16"  # the flag wins
