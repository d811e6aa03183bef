"""Air-gapped use: base weights from S3, and a failed download ending in one line that says what to do.

Downloads fail for real here: the network is cut by pointing HTTPS_PROXY at a
closed loopback port (Keras, gdown and requests all honour it), and S3 is the
local moto server with the object missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import keras
import numpy as np
import pytest

from chest_ct.model import WeightsDownloadError, build_model, split_model
from tests.conftest import write_dataset

PROJECT = Path(__file__).resolve().parents[1]
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


@pytest.fixture
def bucket(s3_endpoint, aws_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3")
    name = f"weights-{os.getpid()}-{id(client)}"
    client.create_bucket(Bucket=name)
    return client, name


def test_base_weights_from_s3_are_the_weights_in_the_bucket(bucket, tmp_path):
    client, name = bucket
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "vgg16_notop.weights.h5"
    donor.save_weights(path)
    client.upload_file(str(path), name, "keras/vgg16_notop.weights.h5")  # Keras 3 format keeps its suffix

    base, _ = split_model(build_model(32, f"s3://{name}/keras/vgg16_notop.weights.h5"))

    np.testing.assert_array_equal(base.get_weights()[0], donor.get_weights()[0])


def test_missing_s3_weights_are_one_line_with_the_alternatives(bucket):
    _, name = bucket
    with pytest.raises(WeightsDownloadError) as raised:
        build_model(32, f"s3://{name}/keras/missing.h5")
    message = str(raised.value)
    assert "\n" not in message and f"s3://{name}/keras/missing.h5" in message
    assert "AWS_ENDPOINT_URL" in message and "none" in message


def test_imagenet_weights_without_network_are_one_line_with_the_alternatives(tmp_path, monkeypatch):
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no cached copy
    with pytest.raises(WeightsDownloadError) as raised:
        build_model(32, "imagenet")
    message = str(raised.value)
    assert "\n" not in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" in message
    assert "base_weights=s3://" in message and "none" in message


def _run_local(tmp_path: Path, data: str, *params: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "KERAS_HOME": str(tmp_path / "keras"),
        **env,
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.run_local",
            "--data",
            data,
            "--runs-dir",
            str(tmp_path / "runs"),
            "image_size=32",
            "epochs=1",
            *params,
        ],
        cwd=PROJECT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _assert_ends_in_one_line(proc: subprocess.CompletedProcess, step: str, *expected: str) -> str:
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pipeline failed at step '{step}': "), last
    for text in expected:
        assert text in last, last
    assert "Inner task failed" not in proc.stderr
    return last


@pytest.mark.slow
def test_make_run_offline_with_imagenet_weights_ends_in_one_line(tmp_path):
    data = write_dataset(
        tmp_path / "data",
        {"train": {"adenocarcinoma": 12, "normal": 10}, "valid": {"adenocarcinoma": 5, "normal": 5}},
        size=32,
    )
    proc = _run_local(tmp_path, str(data), "base_weights=imagenet", env=NO_NETWORK)
    _assert_ends_in_one_line(proc, "base-model", "https://storage.googleapis.com/", "base_weights=s3://", "none")


@pytest.mark.slow
def test_make_run_offline_with_the_drive_dataset_ends_in_one_line(tmp_path):
    url = "https://drive.google.com/file/d/1z0mreUtRmR-P-magILsDR3T7M6IkGXtY/view?usp=sharing"
    proc = _run_local(tmp_path, url, "base_weights=none", env=NO_NETWORK)
    _assert_ends_in_one_line(proc, "ingest", url, "pass a local folder or zip")


@pytest.mark.slow
def test_a_missing_s3_dataset_ends_in_one_line(tmp_path, s3_endpoint, aws_credentials):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="empty-datasets")
    proc = _run_local(
        tmp_path,
        "s3://empty-datasets/chest-ct.zip",
        "base_weights=none",
        env={
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    _assert_ends_in_one_line(proc, "ingest", "s3://empty-datasets/chest-ct.zip", "AWS_ENDPOINT_URL")
