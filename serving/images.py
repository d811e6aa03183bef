"""Image files checked with Pillow before they reach TensorFlow: format, size, integrity.

Two steps, so admission can count an image's decoded pixels before paying for
its decode: ``image_pixels`` reads only the header (format, width, height;
decompression bombs are refused here), ``verify_image`` decodes the whole file
to catch truncated or corrupt data. Both raise ``InvalidInput`` (400 /
INVALID_ARGUMENT) naming the element. Thread-safe: they run in executor
threads and touch no global state (Pillow's own decompression-bomb guard sits
far above the server's cap and only matters if the cap is raised past it).
"""

from __future__ import annotations

import io

from kserve.errors import InvalidInput
from PIL import Image, UnidentifiedImageError

from serving.errors import one_line

#: Pillow's names; MPO is the multi-picture JPEG some cameras write (TensorFlow decodes its first picture).
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")


def image_pixels(encoded: bytes, index: int, max_pixels: int, input_name: str = "image") -> int:
    """Width x height from the header of a PNG/JPEG file, or InvalidInput."""
    where = f"input '{input_name}' element {index}"
    try:
        with Image.open(io.BytesIO(encoded)) as img:  # reads the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"{where}: image is too large ({one_line(str(exc))}); the limit is {max_pixels} pixels"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{where}: not a PNG or JPEG image (cannot identify the file format)") from exc
    except Exception as exc:  # Pillow raises assorted errors on hostile headers
        raise InvalidInput(
            f"{where}: cannot read the image header: the file is truncated or corrupt "
            f"({type(exc).__name__}: {one_line(str(exc))})"
        ) from exc
    if fmt not in IMAGE_FORMATS:
        raise InvalidInput(f"{where}: image format {fmt} is not accepted; send PNG or JPEG")
    if width < 1 or height < 1:
        raise InvalidInput(f"{where}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(
            f"{where}: image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels (decompression bomb guard)"
        )
    return width * height


def verify_image(encoded: bytes, index: int, input_name: str = "image") -> None:
    """Decode the whole file (after ``image_pixels`` accepted its header); InvalidInput if it is damaged."""
    where = f"input '{input_name}' element {index}"
    with Image.open(io.BytesIO(encoded)) as img:
        kind = "PNG" if img.format == "PNG" else "JPEG"
    try:
        if kind == "PNG":  # verify() checks chunk CRCs and that the file runs to IEND
            with Image.open(io.BytesIO(encoded)) as img:
                img.verify()
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()  # full decode: catches truncated and corrupt image data
    except Exception as exc:
        raise InvalidInput(
            f"{where}: {kind} file is truncated or corrupt ({type(exc).__name__}: {one_line(str(exc))})"
        ) from exc
