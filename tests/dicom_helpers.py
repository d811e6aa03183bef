"""Real DICOM test material: pydicom's own CT and MR files, CT slices with chosen pixels, hostile variants.

Every file starts from one that ships in pydicom's wheel (``pydicom.data``), so
the headers, transfer syntaxes and encodings are those real scanners write.
"""

from __future__ import annotations

import functools
import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

#: The pixel cap the tests give the reader (CT_small is 128 x 128).
TEST_MAX_PIXELS = 16_777_216


def real(name: str) -> bytes:
    """A file of pydicom's test data, as bytes."""
    return Path(get_testdata_file(name)).read_bytes()


def _save(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_dicom(hu: np.ndarray, *, slope: float = 1.0, intercept: float = -1024.0, **changes) -> bytes:
    """A DICOM CT file with ``hu`` as its pixels: pydicom's real CT_small.dcm with new pixel data.

    Stored values are ``(hu - intercept) / slope`` as int16; ``changes`` set any other element by keyword.
    """
    ds = pydicom.dcmread(io.BytesIO(real("CT_small.dcm")))
    stored = np.round((np.asarray(hu, np.float64) - intercept) / slope).astype(np.int16)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return _save(ds)


def changed(name: str, **changes) -> bytes:
    """pydicom's file ``name`` with elements set by keyword (``None`` deletes one)."""
    ds = pydicom.dcmread(io.BytesIO(real(name)))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _save(ds)


def multi_frame() -> bytes:
    """CT_small as three frames of the same slice."""
    ds = pydicom.dcmread(io.BytesIO(real("CT_small.dcm")))
    ds.NumberOfFrames, ds.PixelData = 3, ds.PixelData * 3
    return _save(ds)


@functools.cache
def deflate_bomb(megabytes: int = 300) -> bytes:
    """A deflated-transfer-syntax CT file whose ~300 KB dataset inflates to ``megabytes`` MB of zeros."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID, meta.ImplementationClassUID = DeflatedExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    payload = b"".join(deflate.compress(zeros) for _ in range(megabytes)) + deflate.flush()
    return b"\0" * 128 + b"DICM" + fp.getvalue() + payload


def hostile() -> dict[str, tuple[bytes, str]]:
    """Bad DICOM files, each with the words its refusal must contain."""
    ct = real("CT_small.dcm")
    return {
        "no pixel data": (changed("CT_small.dcm", PixelData=None), "no pixel data"),
        "structured report": (real("reportsi.dcm"), "no pixel data"),
        "not CT (MR)": (real("MR_small.dcm"), "Modality is 'MR', not 'CT'"),
        "compressed, no decoder (JPEG-LS)": (
            changed("MR_small_jpeg_ls_lossless.dcm", Modality="CT"),
            "compressed as JPEG-LS Lossless Image Compression",
        ),
        "multi-frame": (multi_frame(), "multi-frame file (3 frames)"),
        "truncated in the pixels": (ct[:20000], "pixel data is truncated"),
        "truncated in the header": (ct[:3000], "cut off before its pixels"),
        "over the pixel cap": (
            changed("CT_small.dcm", Rows=5000, Columns=5000),
            f"5000x5000 = 25000000 pixels is over the cap of {TEST_MAX_PIXELS}",
        ),
        "colour": (changed("SC_rgb_rle.dcm", Modality="CT"), "SamplesPerPixel is 3"),
        "no DICM marker": (b"\0" * 200, "not a DICOM file: no 'DICM' marker at byte 128"),
        "deflate bomb": (deflate_bomb(), "inflates to more than"),
    }
