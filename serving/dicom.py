"""DICOM CT slices -> Hounsfield units, with pydicom: the one DICOM reader of chest-ct.

The server's ``dicom`` input reads files with these functions, and so does ingest
(``chest_ct.images``) and training: a file passes ingest exactly when the server
can read it, and both get the same HU array from it. Everything after the HU
(the lung window, resizing, the model) is in the exported SavedModel; this module
only decodes and applies the file's rescale (``RescaleSlope`` x stored value +
``RescaleIntercept``, pydicom's modality LUT). No TensorFlow, no kserve: the
serving image and the training image both run it.

Two steps, so the server can count a file's pixels before paying for its decode:
:func:`read_header` parses the file and checks it (DICOM Part 10, pixel data
present, Modality CT, one frame, one sample per pixel, pixel count under the cap,
a decoder installed for its transfer syntax); :func:`to_hu` decodes the pixels
(truncated or corrupt pixel data fail here). Every refusal is a
:class:`DicomError` whose message says what was found and what was expected.
Thread-safe: nothing global is touched.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: A DICOM Part 10 file: a 128-byte preamble, then these four bytes.
MAGIC, MAGIC_OFFSET = b"DICM", 128
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: The File Meta Information Group Length element, (0002,0000) UL, that opens every Part 10 file's meta group.
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"


class DicomError(ValueError):
    """The file is not a DICOM CT slice the model can read; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DicomSlice:
    """A checked, not yet decoded, single-frame CT slice."""

    dataset: FileDataset
    rows: int
    columns: int
    transfer_syntax: str

    @property
    def pixels(self) -> int:
        return self.rows * self.columns


def is_dicom(data: bytes | memoryview) -> bool:
    """True for a DICOM Part 10 file (preamble + ``DICM``), whatever its name."""
    return len(data) >= MAGIC_OFFSET + 4 and bytes(data[MAGIC_OFFSET : MAGIC_OFFSET + 4]) == MAGIC


def _int(ds: FileDataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{keyword} is {str(value)[:40]!r}, not an integer") from None


def read_header(data: bytes, max_pixels: int) -> DicomSlice:
    """Parse ``data`` and check it is one CT slice this installation can decode, under ``max_pixels``."""
    if not is_dicom(data):
        raise DicomError(
            f"not a DICOM file: no '{MAGIC.decode()}' marker at byte {MAGIC_OFFSET} "
            "(a DICOM Part 10 file starts with a 128-byte preamble and 'DICM')"
        )
    _check_deflated(data, max_bytes=4 * max_pixels + (1 << 20))
    try:
        ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    except InvalidDicomError as exc:
        raise DicomError(f"not a readable DICOM file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged headers
        raise DicomError(
            f"cannot parse the DICOM header, the file is truncated or corrupt ({type(exc).__name__}: {str(exc)[:150]})"
        ) from None
    if not any(tag in ds for tag in PIXEL_DATA_TAGS):
        raise DicomError(
            "no pixel data: the file holds no image (e.g. a report or a structured document), "
            f"or it was cut off before its pixels ({len(data)} bytes)"
        )
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "CT":
        raise DicomError(
            f"Modality is {modality or 'missing'!r}, not 'CT': the model reads CT slices in Hounsfield units"
        )
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise DicomError(
            f"multi-frame file ({frames} frames) where one slice is expected; send each slice as its own file"
        )
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise DicomError(f"SamplesPerPixel is {samples} (colour); a CT slice has one grey value per pixel")
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if not rows or not columns:
        raise DicomError(f"Rows x Columns is {rows}x{columns}: the image has no pixels")
    if rows * columns > max_pixels:
        raise DicomError(f"{columns}x{rows} = {rows * columns} pixels is over the cap of {max_pixels} pixels")
    syntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise DicomError("the file meta information has no Transfer Syntax UID, so the pixel data cannot be read")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"transfer syntax {syntax} ({syntax.name}) has no pixel data decoder in pydicom") from None
    if not decoder.is_available:
        raise DicomError(
            f"pixel data is compressed as {syntax.name} ({syntax}) and no decoder for it is "
            "installed; send it uncompressed, RLE, JPEG baseline or JPEG 2000"
        )
    return DicomSlice(ds, rows, columns, str(syntax))


def _check_deflated(data: bytes, max_bytes: int) -> None:
    """A deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) must inflate to at most ``max_bytes``.

    pydicom inflates the whole dataset in one ``zlib.decompress`` before parsing it, so a
    few hundred kilobytes of deflated zeros would become gigabytes in memory: a
    decompression bomb. This inflates at most ``max_bytes + 1`` bytes first, the bound
    being that of a file at the pixel cap (4 bytes a pixel and 1 MiB of metadata).
    """
    head = bytes(data[: MAGIC_OFFSET + 4 + 4096])  # the meta group: a few hundred bytes in practice
    if DeflatedExplicitVRLittleEndian.encode() not in head:
        return
    if head[MAGIC_OFFSET + 4 : MAGIC_OFFSET + 12] != _GROUP_LENGTH:
        raise DicomError(
            "deflated DICOM without its File Meta Information Group Length: where the deflated "
            "dataset starts is unknown"
        )
    (length,) = struct.unpack_from("<I", head, MAGIC_OFFSET + 12)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(bytes(data[MAGIC_OFFSET + 16 + length :]), max_bytes + 1)
    except zlib.error as exc:
        raise DicomError(f"the deflated dataset is corrupt ({exc})") from None
    if len(inflated) > max_bytes:
        raise DicomError(
            f"the deflated dataset inflates to more than {max_bytes} bytes, more than a slice at the "
            "pixel cap needs (a decompression bomb)"
        )


def to_hu(dicom: DicomSlice) -> np.ndarray:
    """Decode the pixels and apply the rescale: float32 ``[rows, columns]`` in Hounsfield units."""
    ds = dicom.dataset
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, OSError...
        message = " ".join(str(exc).split())[:200]
        what = "truncated" if "less than expected" in message or "truncat" in message.lower() else "unreadable"
        raise DicomError(f"pixel data is {what} ({type(exc).__name__}: {message})") from None
    if stored.shape != (dicom.rows, dicom.columns):
        raise DicomError(f"pixel data decodes to shape {stored.shape}, expected one {dicom.rows}x{dicom.columns} slice")
    try:
        hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - a malformed rescale or modality LUT
        raise DicomError(
            f"cannot apply the rescale (RescaleSlope/RescaleIntercept): {type(exc).__name__}: {str(exc)[:150]}"
        ) from None
    if not np.all(np.isfinite(hu)):
        slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
        raise DicomError(f"the rescale (slope {slope}, intercept {intercept}) gives values that are not finite")
    return hu


def read_hu(data: bytes, max_pixels: int) -> np.ndarray:
    """Check and decode a DICOM CT slice: float32 ``[rows, columns]`` in Hounsfield units, or DicomError."""
    return to_hu(read_header(data, max_pixels))
