"""DICOM CT slices in ingest and training: found by name or content, read into HU, windowed as the SavedModel does.

Real DICOM throughout: pydicom's own CT files (CT_small.dcm, JPEG 2000 slices) and
hostile variants built from them (tests/dicom_helpers.py).
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import tensorflow as tf

from chest_ct.images import InvalidImage, inspect_files, inspect_image
from chest_ct.ingest import build_dataset
from chest_ct.layout import scan
from chest_ct.preprocess import file_to_pixels, hu_to_pixels, resize, window_hu
from chest_ct.records import Manifest
from chest_ct.window import Window
from serving.dicom import DicomError, read_header, read_hu, to_hu
from tests.conftest import write_dataset
from tests.dicom_helpers import TEST_MAX_PIXELS, changed, ct_dicom, hostile, real
from tests.serving_helpers import ct_like

# --- the reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "deflated"])
def test_real_ct_slices_become_hounsfield_units_with_their_rescale(name):
    """Uncompressed, JPEG 2000 and deflated slices: HU = stored value x RescaleSlope + RescaleIntercept."""
    data = changed("image_dfl.dcm", Modality="CT") if name == "deflated" else real(name)
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    hu = read_hu(data, TEST_MAX_PIXELS)
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    expected = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    np.testing.assert_array_equal(hu, expected.astype(np.float32))


def test_a_fractional_slope_and_shifted_intercept_are_applied():
    hu = ct_like(3, size=48)
    data = ct_dicom(hu, slope=0.5, intercept=-2048.0)
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, -2048.0)
    got = read_hu(data, TEST_MAX_PIXELS)
    assert np.max(np.abs(got - hu)) <= 0.25 + 1e-4, "stored in half-HU steps, read back within rounding"


@pytest.mark.parametrize("kind", list(hostile()))
def test_every_kind_of_bad_dicom_is_refused_with_its_reason(kind):
    data, reason = hostile()[kind]
    with pytest.raises(DicomError, match=None) as caught:
        read_hu(data, TEST_MAX_PIXELS)
    assert reason in caught.value.reason, caught.value.reason


def test_the_pixel_cap_is_read_from_the_header_before_any_pixel_is_decoded():
    bomb = changed("CT_small.dcm", Rows=5000, Columns=5000)
    assert len(bomb) < 100_000
    with pytest.raises(DicomError, match="over the cap"):
        read_header(bomb, TEST_MAX_PIXELS)
    header = read_header(real("CT_small.dcm"), TEST_MAX_PIXELS)  # a checked header decodes separately
    assert (header.rows, header.columns, header.pixels) == (128, 128, 128 * 128)
    assert to_hu(header).shape == (128, 128)


# --- layout: DICOM by name and by content -------------------------------------------------------


def test_dicom_files_are_found_by_suffix_and_by_content(tmp_path):
    root = write_dataset(tmp_path / "data", {"train": {"adenocarcinoma": 2, "normal": 2}})
    folder = root / "train" / "normal"
    slice_ = ct_dicom(ct_like(1))
    for name in ("a.dcm", "b.DICOM", "IM000123", "1.2.840.113619.2.55.3.604688119.971"):
        (folder / name).write_bytes(slice_)
    (folder / "notes").write_text("no suffix and not DICOM")
    (folder / "c.txt").write_bytes(slice_)  # content decides for any other suffix, too
    found = scan(root)
    candidates = {c.path for c in found.candidates}
    for name in ("a.dcm", "b.DICOM", "IM000123", "1.2.840.113619.2.55.3.604688119.971", "c.txt"):
        assert f"train/normal/{name}" in candidates
    ignored = {i.path: i.reason for i in found.ignored}
    assert ignored["train/normal/notes"].startswith("unsupported type 'no suffix'")
    assert "or a DICOM file by content" in ignored["train/normal/notes"]


# --- validation and description -----------------------------------------------------------------


def test_a_dicom_slice_is_described_as_the_model_sees_it(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(real("CT_small.dcm"))
    info = inspect_image(path)
    assert (info.format, info.mode, info.width, info.height) == ("DICOM", "HU", 128, 128)
    hu = read_hu(real("CT_small.dcm"), TEST_MAX_PIXELS)
    grey = np.round(window_hu(hu, Window()).numpy())
    assert info.brightness_mean == pytest.approx(grey.mean(), abs=1e-3)
    bone = inspect_image(path, window=Window(level=400, width=1800))
    assert bone.brightness_mean != info.brightness_mean, "described through the window it is given"


def test_bad_dicom_files_are_quarantined_with_their_reasons_in_worker_processes(tmp_path):
    cases = hostile()
    paths = []
    for i, (data, _) in enumerate(cases.values()):
        paths.append(tmp_path / f"{i}.dcm")
        paths[-1].write_bytes(data)
    good = tmp_path / "good.dcm"
    good.write_bytes(real("693_J2KI.dcm"))
    results = inspect_files([*paths, good], max_pixels=TEST_MAX_PIXELS, workers=2)
    for (kind, (_, reason)), path, result in zip(cases.items(), paths, results, strict=False):
        assert isinstance(result, InvalidImage), kind
        assert result.path == str(path) and result.reason.startswith("DICOM: ") and reason in result.reason, (
            kind,
            result.reason,
        )
    assert results[-1].format == "DICOM" and (results[-1].width, results[-1].height) == (512, 512)


def test_ingest_keeps_dicom_beside_png_and_quarantines_bad_dicom(tmp_path):
    root = write_dataset(
        tmp_path / "data", {"train": {"adenocarcinoma": 6, "normal": 6}, "valid": {"adenocarcinoma": 2, "normal": 2}}
    )
    for i in range(3):
        (root / "train" / "adenocarcinoma" / f"slice{i}.dcm").write_bytes(ct_dicom(ct_like(10 + i, nodule=True)))
        (root / "valid" / "normal" / f"IM{i:04d}").write_bytes(ct_dicom(ct_like(20 + i)))
    (root / "train" / "normal" / "mr.dcm").write_bytes(real("MR_small.dcm"))
    report = build_dataset(root, tmp_path / "out", window=Window(level=-500, width=1400))
    assert report["files"]["images"] == 16 + 6 and report["files"]["quarantined"] == 1
    (bad,) = report["quarantined"]
    assert bad["path"] == "train/normal/mr.dcm" and "DICOM: Modality is 'MR', not 'CT'" in bad["reason"]
    manifest = Manifest.load(tmp_path / "out")
    dicoms = [r for r in manifest.records if r.image.format == "DICOM"]
    assert len(dicoms) == 6 and all(r.image.mode == "HU" for r in dicoms)
    for r in dicoms:  # the artifact keeps the file as it was, in Hounsfield units
        assert (tmp_path / "out" / r.stored_as).read_bytes() == (root / r.path).read_bytes()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format_version"] == 2


# --- training reads DICOM through the same window as the SavedModel -----------------------------


def test_training_pipeline_reads_dicom_as_serve_hu_does():
    """file_to_pixels (tf.data) on a DICOM file == the serve_hu graph's windowing and resizing of its HU."""
    window = Window(level=-600, width=1500)
    for data in (real("CT_small.dcm"), ct_dicom(ct_like(4, size=80))):
        from_file = file_to_pixels(tf.constant(data), 32, window).numpy()
        hu = read_hu(data, TEST_MAX_PIXELS)
        from_graph = resize(hu_to_pixels(tf.constant(hu[None]), window), 32).numpy()[0]
        np.testing.assert_allclose(from_file, from_graph, atol=1e-4)
        assert from_file.shape == (32, 32, 3) and np.all(from_file[..., 0] == from_file[..., 2])


def test_window_values_are_checked():
    for kwargs, message in (
        ({"width": 0}, "window_width=0"),
        ({"level": float("nan")}, "window_level=nan"),
        ({"width": True}, "window_width=True"),
    ):
        with pytest.raises(ValueError, match=message):
            Window(**kwargs)
