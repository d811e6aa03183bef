"""The model's inputs: what metadata advertises, and a v2 request's tensor turned into model input.

Every problem raises ``kserve.errors.InvalidInput`` (HTTP 400, gRPC
INVALID_ARGUMENT) naming the input and the problem; anything the client wrote
(names, datatypes, shapes, values) is quoted through ``clip``: one line, at
most 200 characters. Tensor data arrives in three forms:

- REST JSON: ``data`` is a (possibly nested) list; BYTES elements are base64 strings;
- REST binary tensor extension and gRPC ``raw_input_contents``: raw little-endian
  bytes (BYTES elements are 4-byte-length-prefixed);
- gRPC typed ``contents``: the protobuf's repeated field, read straight into numpy.

Each step sizes its work by the declared shape first, so no request makes the
server build more than the data it declared: BYTES splitting stops at N+1
elements, binary and gRPC pixel data go straight to float32. A new input is one
more ``InputSpec`` whose parser returns a batch: image files (``ImageBatch``) are
checked with Pillow in ``serving.images``, DICOM files (``DicomBatch``) with
pydicom in ``serving.dicom``.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from serving.config import ServerConfig
from serving.errors import clip, one_line


@dataclass(frozen=True)
class ImageBatch:
    """Encoded image files, not yet checked with Pillow."""

    encoded: list[bytes]


@dataclass(frozen=True)
class PixelBatch:
    pixels: np.ndarray  # float32 [N, H, W, 3], checked


@dataclass(frozen=True)
class DicomBatch:
    """DICOM files (CT slices), not yet parsed."""

    encoded: list[bytes]


Batch = ImageBatch | PixelBatch | DicomBatch


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatypes: tuple[str, ...]  # the first is the one metadata advertises
    shape: tuple[int, ...]  # -1: any size
    help: str
    parse: Callable[[InferInput, ServerConfig], Batch]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


def parse_image_input(inp: InferInput, config: ServerConfig) -> ImageBatch:
    return ImageBatch(_files(inp, config, "encoded PNG/JPEG files", "the base64-encoded image file"))


def parse_dicom_input(inp: InferInput, config: ServerConfig) -> DicomBatch:
    return DicomBatch(_files(inp, config, "DICOM files", "the base64-encoded DICOM file"))


def _files(inp: InferInput, config: ServerConfig, what: str, element: str) -> list[bytes]:
    """The elements of a BYTES input of N files, each non-empty, at most N+1 split out of binary data."""
    where = f"input '{inp.name}'"
    if inp.datatype != "BYTES":
        raise InvalidInput(f"{where}: datatype must be BYTES ({what}), got {clip(inp.datatype)}")
    shape = _shape(inp, where)
    if len(shape) != 1:
        raise InvalidInput(f"{where}: shape must be [N] (one encoded file per element), got {clip(shape)}")
    n = _check_count(shape[0], where, config)
    raw = _raw_data(inp)
    if raw is not None:
        elements = _split_length_prefixed(raw, n, where)
    else:
        data = inp.data
        if isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
            raise InvalidInput(f"{where}: 'data' must be a list of base64 strings")
        if len(data) != n:  # before decoding anything
            raise InvalidInput(f"{where}: shape {clip(shape)} says {n} element(s) but data holds {len(data)}")
        elements = [_element_bytes(item, i, where, element) for i, item in enumerate(data)]
    if len(elements) != n:
        raise InvalidInput(
            f"{where}: shape {clip(shape)} says {n} element(s) but data holds "
            f"{'more' if len(elements) > n else len(elements)}"
        )
    for i, value in enumerate(elements):
        if not value:
            raise InvalidInput(f"{where}: element {i} is empty")
    return elements


def _element_bytes(item: Any, i: int, where: str, element: str = "the base64-encoded image file") -> bytes:
    if isinstance(item, (bytes, bytearray)):  # gRPC bytes_contents: already raw
        return bytes(item)
    if isinstance(item, str):  # REST JSON: base64 text
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(
                f"{where}: element {i} is not valid base64 ({one_line(str(exc))}); in JSON each element "
                f"must be {element}"
            ) from exc
    raise InvalidInput(f"{where}: element {i} must be a base64 string, got {type(item).__name__}")


def _split_length_prefixed(raw: bytes | memoryview, n: int, where: str) -> list[bytes]:
    """BYTES wire format (uint32 little-endian length, then the bytes), read up to element N+1 at most."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(out) <= n:
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: binary BYTES data is malformed (truncated length prefix at byte {offset})")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"{where}: binary BYTES data is malformed (element {len(out)} declares {length} "
                f"bytes but only {len(raw) - offset} remain)"
            )
        out.append(bytes(raw[offset : offset + length]))
        offset += length
    return out


def parse_pixels_input(inp: InferInput, config: ServerConfig) -> PixelBatch:
    where = f"input '{inp.name}'"
    if inp.datatype not in ("UINT8", "FP32"):
        raise InvalidInput(f"{where}: datatype must be UINT8 or FP32 (RGB values 0-255), got {clip(inp.datatype)}")
    shape = _shape(inp, where)
    if len(shape) != 4:
        raise InvalidInput(f"{where}: shape must be [N, H, W, 3] (rank 4), got {clip(shape)} (rank {len(shape)})")
    n, height, width, channels = shape
    if channels != 3:
        raise InvalidInput(f"{where}: last dimension must be 3 (RGB channels), got {channels} in shape {clip(shape)}")
    _check_count(n, where, config)
    if height < 1 or width < 1:
        raise InvalidInput(f"{where}: height and width must be at least 1, got shape {clip(shape)}")
    if height * width > config.max_image_pixels:
        raise InvalidInput(
            f"{where}: images are {width}x{height} = {width * height} pixels, over the limit of "
            f"{config.max_image_pixels} pixels"
        )
    count = n * height * width * channels
    values = _pixel_values(inp, count, shape, where)
    if not np.all(np.isfinite(values)):
        raise InvalidInput(f"{where}: data contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise InvalidInput(f"{where}: values must be RGB intensities within 0..255, got min {low:g} max {high:g}")
    return PixelBatch(values.reshape(shape))


def _pixel_values(inp: InferInput, count: int, shape: list[int], where: str) -> np.ndarray:
    """The data as a flat float32 array of ``count`` values: binary and gRPC data straight to float32."""
    raw = _raw_data(inp)
    if raw is not None:
        dtype = np.dtype(np.uint8 if inp.datatype == "UINT8" else "<f4")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"{where}: shape {clip(shape)} of {inp.datatype} needs {count * dtype.itemsize} bytes "
                f"of binary data, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).astype(np.float32)
    data = inp.data
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
        raise InvalidInput(f"{where}: 'data' must be a list of numbers")
    if not isinstance(data, list):  # gRPC typed contents: a protobuf repeated field, numbers by construction
        if len(data) != count:
            raise InvalidInput(f"{where}: shape {clip(shape)} needs {count} values but data holds {len(data)}")
        return np.asarray(data, dtype=np.float32)
    try:  # JSON: numpy reads the nested lists once (int64 or float64, which also tells numbers from strings)
        values = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise InvalidInput(f"{where}: 'data' must be a regular (non-ragged) array of numbers") from None
    if values.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: 'data' must contain only numbers, got {values.dtype.name} values")
    if values.size != count:
        raise InvalidInput(f"{where}: shape {clip(shape)} needs {count} values but data holds {values.size}")
    if (
        inp.datatype == "UINT8"
        and values.dtype.kind == "f"
        and np.all(np.isfinite(values))
        and not np.array_equal(values, np.round(values))
    ):
        raise InvalidInput(f"{where}: UINT8 data must be whole numbers")
    return values.reshape(-1).astype(np.float32)


INPUTS: tuple[InputSpec, ...] = (
    InputSpec("image", ("BYTES",), (-1,), "N encoded PNG/JPEG files (base64 in JSON)", parse_image_input),
    InputSpec(
        "pixels", ("FP32", "UINT8"), (-1, -1, -1, 3), "RGB values 0-255, any height and width", parse_pixels_input
    ),
    InputSpec(
        "dicom",
        ("BYTES",),
        (-1,),
        "N DICOM CT slices (Part 10 files, base64 in JSON), all of one size",
        parse_dicom_input,
    ),
)
INPUTS_HELP = "send exactly one input: " + " or ".join(
    f"'{s.name}' ({' or '.join(s.datatypes)}, shape {list(s.shape)}: {s.help})" for s in INPUTS
)


def parse_inputs(request: InferRequest, config: ServerConfig) -> Batch:
    """The request's single input as model input; afterwards the request no longer holds the tensor data."""
    inputs = list(request.inputs or [])
    specs = {spec.name: spec for spec in INPUTS}
    names = [inp.name for inp in inputs]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise InvalidInput(f"unknown input {clip(unknown[0])}; {INPUTS_HELP}")
    if not inputs:
        raise InvalidInput(f"the request has no inputs; {INPUTS_HELP}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"input {clip(names[0])} is given more than once; {INPUTS_HELP}")
    if len(inputs) > 1:
        raise InvalidInput(
            f"{' and '.join(repr(n) for n in names)} were {'both' if len(names) == 2 else 'all'} given; {INPUTS_HELP}"
        )
    batch = specs[inputs[0].name].parse(inputs[0], config)
    request.inputs = []  # queued requests keep only the model input, not the decoded body
    return batch


def _shape(inp: InferInput, where: str) -> list[int]:
    shape = inp.shape
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers, got {clip(shape)}")
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {clip(shape)} has a negative dimension")
    return shape


def _check_count(n: int, where: str, config: ServerConfig) -> int:
    if n == 0:
        raise InvalidInput(f"{where}: N=0 (empty batch); send at least one image")
    if n > config.max_images:
        raise InvalidInput(
            f"{where}: N={n} images is over the limit of {config.max_images} per request; split the batch"
        )
    return n


def _raw_data(inp: InferInput) -> bytes | memoryview | None:
    """Binary tensor data (REST binary extension or gRPC raw_input_contents), if the input came that way.

    kserve keeps it in the private ``_raw_data`` attribute (its own ``as_numpy`` reads it there); it is
    read directly so BYTES elements stay raw bytes instead of being forced through UTF-8. The REST route
    stores a memoryview of the body there, so nothing is copied before the data is checked.
    """
    return getattr(inp, "_raw_data", None)
