"""``make run`` on a dataset with DICOM in it, then the trained model served: the issue's "done when".

The dataset mixes PNG exports and DICOM files of CT-like slices with variants of
pydicom's real CT slice (shifted, re-windowed intercepts, as DICOM). The run must
ingest the DICOM, train through the window, put the guard and the window in the
SavedModel, report the guard's rates in the evaluation and MLflow, and the server
must answer a test DICOM file with the probability of the in-process model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from mlflow import MlflowClient

from chest_ct.predict import predict_outputs
from chest_ct.records import Manifest
from tests.dicom_helpers import TEST_MAX_PIXELS, ct_dicom, real
from tests.serving_helpers import MODEL_NAME, InProcessModel, ServerProcess, b64, ct_like, encode, lung_window
from tests.test_pipeline_local import FAST, run_local

pytestmark = pytest.mark.slow


def _real_ct_variants(seed: int, nodule: bool) -> list[bytes]:
    """pydicom's CT_small shifted and with its intercept moved; the positive class gets a soft-tissue nodule."""
    ds = pydicom.dcmread(io.BytesIO(real("CT_small.dcm")))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(2):
        variant = np.roll(hu, tuple(rng.integers(-12, 12, 2)), axis=(0, 1)).copy()
        if nodule:
            yy, xx = np.mgrid[:128, :128]
            cy, cx = rng.integers(40, 88, 2)
            variant[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 30.0
        out.append(ct_dicom(variant, intercept=-1024.0 - 8 * k))
    return out


def write_mixed_dataset(root: Path) -> Path:
    counts = {"train": (8, 6), "valid": (3, 2), "test": (3, 3)}  # (PNG, DICOM) per class
    seed = 0
    for split, (pngs, dicoms) in counts.items():
        for label in ("normal", "adenocarcinoma"):
            folder = root / split / label
            folder.mkdir(parents=True)
            nodule = label == "adenocarcinoma"
            for i in range(pngs):
                seed += 1
                (folder / f"png{i}.png").write_bytes(encode(lung_window(ct_like(seed, nodule=nodule))))
            for i in range(dicoms):
                seed += 1
                name = f"IM{i:04d}" if i % 2 else f"slice{i}.dcm"  # DICOM by content and by name
                (folder / name).write_bytes(ct_dicom(ct_like(seed, nodule=nodule)))
            if split == "train":
                for i, data in enumerate(_real_ct_variants(seed, nodule)):
                    (folder / f"real{i}.dcm").write_bytes(data)
    return root


def test_a_dicom_dataset_runs_through_make_run_and_the_server_answers_like_the_model(tmp_path):
    data = write_mixed_dataset(tmp_path / "data")
    proc = run_local(tmp_path, str(data), *FAST, "window_level=-550", "window_width=1400", "ood_quantile=0.99")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    validation = json.loads(Path(result["validation_report"]).read_text())
    assert validation["files"]["quarantined"] == 0 and validation["files"]["ignored"] == 0
    dataset = Manifest.load(Path(result["validation_report"]).parent / "dataset")
    dicom = [r for r in dataset.records if r.image.format == "DICOM"]
    assert len(dicom) == 2 * (6 + 2 + 2 + 3) and all(r.image.mode == "HU" for r in dicom)

    model_dir = Path(result["model_dir"])
    meta = json.loads((model_dir / "model_metadata.json").read_text())
    assert meta["window"] == {"level": -550.0, "width": 1400.0}
    assert meta["ood"]["quantile"] == 0.99 and meta["ood"]["threshold"] > 0
    assert "serve_hu" in meta["signatures"]

    evaluation = json.loads(Path(result["evaluation_report"]).read_text())
    guard = evaluation["guard"]
    assert guard["test_images"] == result["scored_images"] >= 10
    assert guard["foreign_images"] >= 60 and set(guard["per_category"]) >= {"natural photo", "CT in bone window"}
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.metrics["guard_test_accept_rate"] == pytest.approx(guard["test_accept_rate"])
    assert run.data.metrics["guard_foreign_reject_rate"] == pytest.approx(guard["foreign_reject_rate"])
    assert run.data.params["window_level"] == "-550.0" and "ood_threshold" in run.data.metrics
    print(
        f"guard on the synthetic DICOM run: accepted {guard['test_accepted']}/{guard['test_images']}, "
        f"rejected {guard['foreign_rejected']}/{guard['foreign_images']}"
    )

    test_dicom = [r for r in dataset.role("test") if r.image.format == "DICOM"]
    files = [dataset.file(r) for r in test_dicom]
    in_process = predict_outputs(model_dir, files)
    from serving.dicom import read_hu

    reference = InProcessModel(model_dir).outputs(
        "hu", np.stack([read_hu(Path(f).read_bytes(), TEST_MAX_PIXELS) for f in files])
    )
    assert np.max(np.abs(reference["probability"] - in_process["probability"])) <= 1e-5
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        resp = requests.post(
            f"{server.url}/v2/models/{MODEL_NAME}/infer",
            timeout=60,
            json={
                "inputs": [
                    {
                        "name": "dicom",
                        "datatype": "BYTES",
                        "shape": [len(files)],
                        "data": [b64(Path(f).read_bytes()) for f in files],
                    }
                ]
            },
        )
        assert resp.status_code == 200, resp.text
        out = {o["name"]: o["data"] for o in resp.json()["outputs"]}
    finally:
        server.stop()
    served = np.asarray(out["probability"], np.float32)
    difference = float(np.max(np.abs(served - in_process["probability"])))
    print(f"DICOM parity, server vs in-process model: max |difference| = {difference:.2e} over {len(files)} files")
    assert difference <= 1e-5
    assert out["in_distribution"] == in_process["in_distribution"].tolist()
