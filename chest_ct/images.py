"""Check that an image file is safe and usable, and describe it.

The description (size, format, brightness) feeds the duplicate finder and the
shortcut audit: on chest CT data from mixed web sources, such cues can predict
the label on their own.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

SUPPORTED_FORMATS = ("PNG", "JPEG")
DEFAULT_MAX_PIXELS = 40_000_000  # a 6000x6000 scan; larger is treated as a decompression bomb


class InvalidImage(ValueError):
    """The file is not an image we can train on; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    phash: str
    format: str
    mode: str
    width: int
    height: int
    brightness_mean: float
    brightness_std: float

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode ``path`` fully and describe it, or raise :class:`InvalidImage`.

    The pixel cap is checked from the header, before any pixel is decoded.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt = img.format or "unknown"
                if fmt not in SUPPORTED_FORMATS:
                    raise InvalidImage(f"unsupported image format {fmt} (expected PNG or JPEG)")
                width, height = img.size
                if width * height > max_pixels:
                    raise InvalidImage(
                        f"{width}x{height} = {width * height} pixels is over the cap of {max_pixels} "
                        "(possible decompression bomb)"
                    )
                img.load()
                mode = img.mode
                gray = np.asarray(img.convert("L"), dtype=np.float32)
                phash = str(imagehash.phash(img.convert("RGB")))
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise InvalidImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot decode: {exc}") from exc
    return ImageInfo(
        sha256=sha256_file(path),
        phash=phash,
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        brightness_mean=round(float(gray.mean()), 4),
        brightness_std=round(float(gray.std()), 4),
    )
