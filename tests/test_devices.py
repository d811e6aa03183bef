"""chest_ct.devices: a train step given GPUs stops when TensorFlow cannot see them."""

import pytest
import yaml

from chest_ct import devices

PROJECT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_expected_count_comes_from_the_environment():
    assert devices.expected_gpus({}) == 0  # make run, CPU-only compiles
    assert devices.expected_gpus({"CHEST_CT_EXPECTED_GPUS": "2"}) == 2
    with pytest.raises(ValueError, match="CHEST_CT_EXPECTED_GPUS='one'"):
        devices.expected_gpus({"CHEST_CT_EXPECTED_GPUS": "one"})


def test_enough_gpus_pass_and_too_few_fail_with_the_cause():
    assert devices.check_gpus(1, visible=["/physical_device:GPU:0"]) == ["/physical_device:GPU:0"]
    assert devices.check_gpus(0, visible=[]) == []
    with pytest.raises(devices.GpuUnavailableError, match="given 2 GPU.*TensorFlow sees 1"):
        devices.check_gpus(2, visible=["/physical_device:GPU:0"])


def test_on_this_machine_tensorflow_sees_no_gpu_and_says_why():
    """Real TensorFlow (the CPU build installed here): the message names the cause and the way out."""
    with pytest.raises(devices.GpuUnavailableError) as raised:
        devices.check_gpus(1)
    message = str(raised.value)
    assert "TensorFlow sees 0" in message and "CHEST_CT_GPU_COUNT=0" in message
    assert "CPU build" in message or "no NVIDIA device" in message or "libcuda.so.1" in message


def test_the_smoke_test_command(capsys):
    assert devices.main(["--expect", "0"]) == 0
    assert "GPUs visible to TensorFlow: none" in capsys.readouterr().out
    assert devices.main(["--expect", "1"]) == 1
    assert capsys.readouterr().err.startswith("error: this step was given 1 GPU(s)")


def test_the_compiled_train_step_runs_the_check_before_training():
    spec = next(yaml.safe_load_all((PROJECT / "pipelines" / "chest_ct_pipeline.yaml").read_text()))
    source = "\n".join(spec["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
    assert source.index("check_gpus(expected_gpus())") < source.index("train_and_export(")
    smoke = next(yaml.safe_load_all((PROJECT / "manifests" / "gpu-smoke-test" / "gpu-smoke-test.yaml").read_text()))
    assert smoke["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["python", "-m", "chest_ct.devices"]
