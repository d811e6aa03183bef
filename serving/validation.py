"""Turn a v2 inference request into model input, or say exactly what is wrong with it.

Every problem raises ``kserve.errors.InvalidInput`` (HTTP 400, gRPC
INVALID_ARGUMENT) with a message naming the input and the problem, so that
bad input never reaches TensorFlow as something it could crash or allocate
gigabytes on. Images are checked with Pillow first: format (PNG or JPEG only),
pixel count read from the header before any decoding (decompression bombs),
and a full decode to catch truncated or corrupt files.

Tensor data arrives in three shapes depending on the transport:

- REST JSON: ``data`` is a (possibly nested) list; BYTES elements are base64 strings.
- REST binary tensor extension and gRPC ``raw_input_contents``: raw little-endian
  bytes (BYTES elements are 4-byte-length-prefixed).
- gRPC typed ``contents``: a flat list; BYTES elements are raw ``bytes``.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, to_http_parameters
from PIL import Image, UnidentifiedImageError

IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
PROBABILITY_OUTPUT = "probability"
LABEL_OUTPUT = "label"
OUTPUT_NAMES = (PROBABILITY_OUTPUT, LABEL_OUTPUT)
#: Pillow's names; MPO is the multi-picture JPEG some cameras write (TensorFlow decodes its first picture).
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
PIXEL_DATATYPES = ("UINT8", "FP32")

INPUTS_HELP = (f"send exactly one input: '{IMAGE_INPUT}' (BYTES, shape [N], encoded PNG/JPEG files, "
               f"base64 in JSON) or '{PIXELS_INPUT}' (UINT8 or FP32, shape [N, H, W, 3], RGB 0-255)")


@dataclass(frozen=True)
class Limits:
    """Caps that keep one request from exhausting the server's memory or CPU."""

    max_images: int = 64
    max_image_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class ImageBatch:
    encoded: list[bytes]


@dataclass(frozen=True)
class PixelBatch:
    pixels: np.ndarray  # float32 [N, H, W, 3]


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs to return and, for REST, whether each goes in the binary tensor extension."""

    names: tuple[str, ...]
    binary: dict[str, bool]


def parse_inputs(request: InferRequest, limits: Limits) -> ImageBatch | PixelBatch:
    """The request's single input as an ImageBatch (not yet checked with Pillow) or a PixelBatch."""
    inputs = list(request.inputs or [])
    names = [inp.name for inp in inputs]
    unknown = [n for n in names if n not in (IMAGE_INPUT, PIXELS_INPUT)]
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}; {INPUTS_HELP}")
    if not inputs:
        raise InvalidInput(f"the request has no inputs; {INPUTS_HELP}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"input {names[0]!r} is given more than once; {INPUTS_HELP}")
    if len(inputs) > 1:
        raise InvalidInput(f"both '{IMAGE_INPUT}' and '{PIXELS_INPUT}' were given; {INPUTS_HELP}")
    inp = inputs[0]
    if inp.name == IMAGE_INPUT:
        return ImageBatch(parse_image_input(inp, limits))
    return PixelBatch(parse_pixels_input(inp, limits))


def parse_outputs(request: InferRequest) -> OutputRequest:
    """Requested outputs (all when none are named) and their binary_data flags."""
    params = _params(request.parameters)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidInput(f"request parameter 'binary_data_output' must be true or false, got {default_binary!r}")
    requested = list(request.request_outputs or [])
    if not requested:
        return OutputRequest(OUTPUT_NAMES, {n: default_binary for n in OUTPUT_NAMES})
    names, binary = [], {}
    for out in requested:
        if out.name not in OUTPUT_NAMES:
            raise InvalidInput(f"unknown output {out.name!r}; this model returns "
                               f"'{PROBABILITY_OUTPUT}' (FP32 [N]) and '{LABEL_OUTPUT}' (BYTES [N])")
        if out.name in names:
            raise InvalidInput(f"output {out.name!r} is requested more than once")
        flag = _params(out.parameters).get("binary_data", default_binary)
        if not isinstance(flag, bool):
            raise InvalidInput(f"output {out.name!r}: parameter 'binary_data' must be true or false, got {flag!r}")
        names.append(out.name)
        binary[out.name] = flag
    return OutputRequest(tuple(names), binary)


# --- image (BYTES) -----------------------------------------------------------------------------

def parse_image_input(inp: InferInput, limits: Limits) -> list[bytes]:
    where = f"input '{IMAGE_INPUT}'"
    if inp.datatype != "BYTES":
        raise InvalidInput(f"{where}: datatype must be BYTES (encoded PNG/JPEG files), got {inp.datatype}")
    shape = _shape(inp, where)
    if len(shape) != 1:
        raise InvalidInput(f"{where}: shape must be [N] (one encoded file per element), got {shape}")
    n = shape[0]
    _check_batch_size(n, where, limits)
    raw = _raw_data(inp)
    if raw is not None:
        elements = _split_length_prefixed(raw, where)
    else:
        data = inp.data
        if not isinstance(data, (list, tuple)):
            raise InvalidInput(f"{where}: 'data' must be a list of base64 strings")
        if len(data) != n:  # before decoding anything
            raise InvalidInput(f"{where}: shape {shape} says {n} element(s) but data holds {len(data)}")
        elements = [_element_bytes(item, i, where) for i, item in enumerate(data)]
    if len(elements) != n:
        raise InvalidInput(f"{where}: shape {shape} says {n} element(s) but data holds {len(elements)}")
    for i, element in enumerate(elements):
        if not element:
            raise InvalidInput(f"{where}: element {i} is empty")
    return elements


def _element_bytes(item: Any, i: int, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):  # gRPC bytes_contents: already raw
        return bytes(item)
    if isinstance(item, str):  # REST JSON: base64 text
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"{where}: element {i} is not valid base64 ({exc}); in JSON each element must be "
                               "the base64-encoded image file") from exc
    raise InvalidInput(f"{where}: element {i} must be a base64 string, got {type(item).__name__}")


def _split_length_prefixed(raw: bytes, where: str) -> list[bytes]:
    """BYTES tensor wire format: each element is a uint32 little-endian length then that many bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: binary BYTES data is malformed (truncated length prefix at byte {offset})")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"{where}: binary BYTES data is malformed (element {len(out)} declares {length} "
                               f"bytes but only {len(raw) - offset} remain)")
        out.append(bytes(raw[offset:offset + length]))
        offset += length
    return out


def check_image(encoded: bytes, index: int, limits: Limits) -> None:
    """Raise InvalidInput unless ``encoded`` is a complete PNG/JPEG of at most ``max_image_pixels`` pixels.

    Thread-safe (runs in executor threads): no global warning filters are touched. Pillow's own
    decompression-bomb guard (far above our cap) only matters if the cap is raised past it.
    """
    where = f"input '{IMAGE_INPUT}' element {index}"
    try:
        with Image.open(io.BytesIO(encoded)) as img:  # reads the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{where}: image is too large ({exc}); the limit is "
                           f"{limits.max_image_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{where}: not a PNG or JPEG image (cannot identify the file format)") from exc
    except Exception as exc:  # Pillow raises assorted errors on hostile headers
        raise InvalidInput(f"{where}: cannot read the image header: the file is truncated or corrupt "
                           f"({type(exc).__name__}: {exc})") from exc
    if fmt not in IMAGE_FORMATS:
        raise InvalidInput(f"{where}: image format {fmt} is not accepted; send PNG or JPEG")
    if width < 1 or height < 1:
        raise InvalidInput(f"{where}: image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InvalidInput(f"{where}: image is {width}x{height} = {width * height} pixels, over the limit of "
                           f"{limits.max_image_pixels} pixels (decompression bomb guard)")
    kind = "PNG" if fmt == "PNG" else "JPEG"
    try:
        if kind == "PNG":  # verify() checks chunk CRCs and that the file runs to IEND
            with Image.open(io.BytesIO(encoded)) as img:
                img.verify()
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()  # full decode: catches truncated and corrupt image data
    except Exception as exc:
        raise InvalidInput(f"{where}: {kind} file is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


# --- pixels (UINT8 / FP32) ---------------------------------------------------------------------

def parse_pixels_input(inp: InferInput, limits: Limits) -> np.ndarray:
    where = f"input '{PIXELS_INPUT}'"
    if inp.datatype not in PIXEL_DATATYPES:
        raise InvalidInput(f"{where}: datatype must be UINT8 or FP32 (RGB values 0-255), got {inp.datatype}")
    shape = _shape(inp, where)
    if len(shape) != 4:
        raise InvalidInput(f"{where}: shape must be [N, H, W, 3] (rank 4), got {shape} (rank {len(shape)})")
    n, height, width, channels = shape
    if channels != 3:
        raise InvalidInput(f"{where}: last dimension must be 3 (RGB channels), got {channels} in shape {shape}")
    _check_batch_size(n, where, limits)
    if height < 1 or width < 1:
        raise InvalidInput(f"{where}: height and width must be at least 1, got shape {shape}")
    if height * width > limits.max_image_pixels:
        raise InvalidInput(f"{where}: images are {width}x{height} = {width * height} pixels, over the limit of "
                           f"{limits.max_image_pixels} pixels")
    count = n * height * width * channels
    dtype = np.uint8 if inp.datatype == "UINT8" else np.float32
    raw = _raw_data(inp)
    if raw is not None:
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise InvalidInput(f"{where}: shape {shape} of {inp.datatype} needs {count * np.dtype(dtype).itemsize} "
                               f"bytes of binary data, got {len(raw)}")
        values = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    else:
        values = _numbers(inp.data, where)
        if values.size != count:
            raise InvalidInput(f"{where}: shape {shape} needs {count} values but data holds {values.size}")
        if inp.datatype == "UINT8" and np.all(np.isfinite(values)) and not np.all(values == np.round(values)):
            raise InvalidInput(f"{where}: UINT8 data must be whole numbers")
    if not np.all(np.isfinite(values)):
        raise InvalidInput(f"{where}: data contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise InvalidInput(f"{where}: values must be RGB intensities within 0..255, got min {low:g} max {high:g}")
    return values.astype(np.float32).reshape(shape)


def _numbers(data: Any, where: str) -> np.ndarray:
    if not isinstance(data, (list, tuple)):
        raise InvalidInput(f"{where}: 'data' must be a list of numbers")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise InvalidInput(f"{where}: 'data' must be a regular (non-ragged) array of numbers ({exc})") from exc
    if values.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: 'data' must contain only numbers, got {values.dtype.name} values")
    return values.astype(np.float64).reshape(-1)


# --- shared ------------------------------------------------------------------------------------

def _shape(inp: InferInput, where: str) -> list[int]:
    shape = inp.shape
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                       for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers, got {shape!r}")
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {shape} has a negative dimension")
    return shape


def _check_batch_size(n: int, where: str, limits: Limits) -> None:
    if n == 0:
        raise InvalidInput(f"{where}: N=0 (empty batch); send at least one image")
    if n > limits.max_images:
        raise InvalidInput(f"{where}: N={n} images is over the limit of {limits.max_images} per request; "
                           "split the batch")


def _raw_data(inp: InferInput) -> bytes | None:
    """Binary tensor data (REST binary extension or gRPC raw_input_contents), if the input came that way.

    kserve keeps it in the private ``_raw_data`` attribute (its own ``as_numpy`` reads it there); it is
    read directly so BYTES elements stay raw bytes instead of being forced through UTF-8.
    """
    raw = getattr(inp, "_raw_data", None)
    return None if raw is None else bytes(raw)


def _params(parameters: Any) -> dict:
    """Request/output parameters as a plain dict (gRPC gives a map of InferParameter messages)."""
    return to_http_parameters(parameters) if parameters else {}
