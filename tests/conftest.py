"""Shared fixtures: small synthetic chest-CT-like datasets made on the fly.

Images are noise (so no two are near duplicates by accident) and the positive
class carries a bright blob, so even a randomly initialised VGG16 base gives a
head something to learn.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import browser  # noqa: F401  (the fixture, for every test module)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct"


def synthetic_image(label: str, index: int, *, size: int = 40, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(2 * index + (label == "adenocarcinoma"))
    pixels = rng.integers(0, 120, size=(size, size), dtype=np.uint8)
    if label == "adenocarcinoma":
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] = 240
    image = Image.fromarray(pixels, "L").convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_dataset(
    root: Path, layout: dict[str, dict[str, int]], *, offset: int = 0, folder_names: dict | None = None, **kwargs
) -> Path:
    """``layout``: {split or '' for flat: {class: count}}; images are all distinct."""
    folder_names = folder_names or {}
    n = offset
    for split, classes in layout.items():
        for label, count in classes.items():
            folder = root / split / folder_names.get(label, label) if split else root / folder_names.get(label, label)
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                n += 1
                (folder / f"{n:05d}.png").write_bytes(synthetic_image(label, n, **kwargs))
    return root


@pytest.fixture
def presplit_dataset(tmp_path: Path) -> Path:
    return write_dataset(
        tmp_path / "data",
        {
            "train": {"adenocarcinoma": 14, "normal": 12},
            "valid": {"adenocarcinoma": 6, "normal": 6},
            "test": {"adenocarcinoma": 6, "normal": 6},
        },
    )


@pytest.fixture
def mlflow_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow SQLite store with the chest-ct experiment, used through MLFLOW_TRACKING_URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("chest-ct", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto in server mode) on loopback; boto3 talks HTTP to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials: moto accepts any, boto3 insists on some."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
