"""A fixed set of pictures that are not chest CT slices in the lung window: what the guard must refuse.

Evaluation sends each of them through the exported model and counts the share
the out-of-distribution guard rejects (:mod:`chest_ct.guard_eval`). The set is the
same for every run and needs no download:

- ``natural photo``: scikit-image's sample photographs (shipped in its wheel);
- ``noise``, ``solid colour``, ``gradient``, ``text``: generated here, seeded;
- ``CT in bone window``: real CT slices (pydicom's sample files, plus the DICOM
  slices among the test images) in a bone window instead of the lung window;
- ``CT upside down`` and ``CT inverted``: the test CT images flipped vertically
  and with their grey levels inverted (a left-right mirror is still a plausible
  slice, so it is not in the set).

Every picture is a PNG, sent through the bytes signature as a client would.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chest_ct.window import LUNG_WINDOW, Window
from serving.dicom import is_dicom, read_hu

#: A bone window (-500..1300 HU): bone detail, lungs black.
BONE_WINDOW = Window(level=400.0, width=1800.0)
#: Real CT slices in pydicom's wheel (uncompressed and JPEG 2000, 128 and 512 px).
PYDICOM_CT_FILES = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")
PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "clock",
    "retina",
    "cell",
)
SIZE = 256
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ForeignImage:
    category: str
    name: str
    png: bytes


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG")
    return buffer.getvalue()


def windowed(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU -> 8-bit grey through ``window``: the picture a viewer exports in that window."""
    from chest_ct.preprocess import window_hu

    return np.round(window_hu(hu, window).numpy()).astype(np.uint8)


def photos() -> list[ForeignImage]:
    from skimage import data

    out = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(data, name)())
        out.append(ForeignImage("natural photo", name, png(pixels.astype(np.uint8))))
    return out


def noise(seed: int = 0) -> list[ForeignImage]:
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).resize(
        (SIZE, SIZE), Image.Resampling.BICUBIC
    )
    salt = np.where(rng.random((SIZE, SIZE)) < 0.5, 0, 255).astype(np.uint8)
    return [
        ForeignImage("noise", name, png(pixels))
        for name, pixels in (
            ("uniform RGB", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
            ("uniform grey", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)),
            ("gaussian grey", np.clip(rng.normal(128, 40, (SIZE, SIZE)), 0, 255).astype(np.uint8)),
            ("salt and pepper", salt),
            ("smooth grey", np.asarray(smooth)),
            ("dark gaussian", np.clip(rng.normal(40, 20, (SIZE, SIZE)), 0, 255).astype(np.uint8)),
        )
    ]


def solid_colours() -> list[ForeignImage]:
    colours = {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "mid grey": (128, 128, 128),
        "dark grey": (60, 60, 60),
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
    }
    return [
        ForeignImage("solid colour", name, png(np.full((SIZE, SIZE, 3), rgb, np.uint8)))
        for name, rgb in colours.items()
    ]


def gradients() -> list[ForeignImage]:
    yy, xx = np.mgrid[:SIZE, :SIZE] / (SIZE - 1)
    radial = np.clip(np.hypot(xx - 0.5, yy - 0.5) / np.sqrt(0.5), 0, 1)
    grey = {"horizontal": xx, "vertical": yy, "diagonal": (xx + yy) / 2, "radial": radial}
    out = [ForeignImage("gradient", name, png((g * 255).astype(np.uint8))) for name, g in grey.items()]
    colour = np.stack([xx, yy, 1 - xx], axis=-1)
    return out + [ForeignImage("gradient", "colour", png((colour * 255).astype(np.uint8)))]


def text() -> list[ForeignImage]:
    from skimage import data

    out = []
    for i, (size, dark_on_light) in enumerate(((16, True), (24, True), (16, False), (32, False))):
        image = Image.new("L", (SIZE, SIZE), 255 if dark_on_light else 0)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=size)
        for line in range(SIZE // (size + 6)):
            draw.text(
                (6, 4 + line * (size + 6)),
                f"Patient {i}{line}: CT chest, no contrast",
                fill=0 if dark_on_light else 255,
                font=font,
            )
        out.append(
            ForeignImage("text", f"rendered {size}px {'dark' if dark_on_light else 'light'}", png(np.asarray(image)))
        )
    return out + [ForeignImage("text", name, png(np.asarray(getattr(data, name)()))) for name in ("page", "text")]


def _ct_pixels(file: str, window: Window) -> np.ndarray:
    data = Path(file).read_bytes()
    if is_dicom(data):
        return windowed(read_hu(data, MAX_PIXELS), window)
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _pydicom_test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom's test file {name} is not installed")
    return Path(found)


def bone_windowed(ct_files: Sequence[str] = ()) -> list[ForeignImage]:
    """pydicom's CT slices and any DICOM ``ct_files`` in the bone window (whole, and a centre crop)."""
    sources = [(name, _pydicom_test_file(name).read_bytes()) for name in PYDICOM_CT_FILES]
    sources += [(Path(f).name, data) for f in ct_files if is_dicom(data := Path(f).read_bytes())]
    out = []
    for name, data in sources:
        bone = windowed(read_hu(data, MAX_PIXELS), BONE_WINDOW)
        h, w = bone.shape
        out.append(ForeignImage("CT in bone window", name, png(bone)))
        out.append(
            ForeignImage("CT in bone window", f"{name} centre", png(bone[h // 8 : h - h // 8, w // 8 : w - w // 8]))
        )
    return out


def transformed_ct(ct_files: Sequence[str], window: Window) -> list[ForeignImage]:
    """Each CT image upside down and inverted (DICOM slices first put through ``window``)."""
    out = []
    for f in ct_files:
        pixels = _ct_pixels(f, window)
        out.append(ForeignImage("CT upside down", Path(f).name, png(pixels[::-1])))
        out.append(ForeignImage("CT inverted", Path(f).name, png(255 - pixels)))
    return out


def foreign_set(ct_files: Sequence[str], window: Window = LUNG_WINDOW) -> list[ForeignImage]:
    """The whole set; ``ct_files`` are the evaluation's test images (for the transformed CT categories)."""
    return [
        *photos(),
        *noise(),
        *solid_colours(),
        *gradients(),
        *text(),
        *bone_windowed(ct_files),
        *transformed_ct(ct_files, window),
    ]
