"""Check that image files are safe and usable, and describe them, on every core.

A PNG/JPEG file passes when TensorFlow's decoder, the one training and serving run
(:func:`chest_ct.preprocess.decode`), reads it; Pillow only reads the header first,
to refuse decompression bombs before any pixel is decoded, and turns the decoded
pixels into the perceptual hash (imagehash). A DICOM file (``DICM`` at byte 128,
whatever its name) passes when :mod:`serving.dicom`, the reader training and the
server's ``dicom`` input use, turns it into Hounsfield units; it is described as
the model sees it, through the lung window (:func:`chest_ct.preprocess.window_hu`).
Each file is read once: the bytes that are hashed (sha256) are the bytes that are decoded.

The description (size, format, brightness) feeds the duplicate finder and the
shortcut audit: on chest CT data from mixed web sources, such cues can predict the
label on their own.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from chest_ct.parallel import Progress, available_cpus, process_map
from chest_ct.window import LUNG_WINDOW, Window
from serving.dicom import DicomError, is_dicom, read_hu

SUPPORTED_FORMATS = ("PNG", "JPEG")
DICOM_FORMAT, HU_MODE = "DICOM", "HU"
#: Names that promise DICOM: such a file is read as DICOM (and refused as one) whatever its content.
DICOM_SUFFIXES = (".dcm", ".dicom")
DEFAULT_MAX_PIXELS = 40_000_000  # a 6000x6000 scan; larger is treated as a decompression bomb
# TensorFlow replicates a gray channel into R, G and B, so channel 0 is the luma Pillow would compute.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
# Modules the worker processes import once, in the forkserver (TensorFlow and the decoder).
WORKER_PRELOAD = ("chest_ct.preprocess", "chest_ct.images")


class InvalidImage(ValueError):
    """The file is not an image we can train on; ``reason`` says why, ``path`` which file."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.reason, self.path = reason, path

    def __reduce__(self):  # keep ``path`` across processes
        return (type(self), (self.reason, self.path))


@dataclass(frozen=True, slots=True)
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


def max_file_bytes(max_pixels: int) -> int:
    """A compressed file larger than RGBA pixels at the pixel cap (plus 1 MiB of metadata) is not a plausible image."""
    return 4 * max_pixels + (1 << 20)


def _header(data: bytes, max_pixels: int) -> tuple[str, str, int, int]:
    """Format, mode, width and height from the header alone (no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format or "unknown", img.mode, img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot read the image header: {exc}") from None
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidImage(f"unsupported image format {fmt} (expected PNG or JPEG)")
    if width * height > max_pixels:
        raise InvalidImage(
            f"{width}x{height} = {width * height} pixels is over the cap of {max_pixels} (possible decompression bomb)"
        )
    return fmt, mode, width, height


def _tf_message(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:\w+\].*", "", message, flags=re.DOTALL).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def _decode(data: bytes) -> np.ndarray:
    from chest_ct.preprocess import decode  # TensorFlow: imported on first use, once per process

    try:
        return decode(data).numpy()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the file is unusable
        raise InvalidImage(
            f"cannot decode with TensorFlow, the decoder training and serving use: {_tf_message(exc)}"
        ) from None


def _windowed(data: bytes, max_pixels: int, window: Window) -> Image.Image:
    """A DICOM CT slice as the model sees it: HU through the window, rounded to 8-bit grey."""
    from chest_ct.preprocess import window_hu  # TensorFlow: imported on first use, once per process

    try:
        hu = read_hu(data, max_pixels)
    except DicomError as exc:
        raise InvalidImage(f"DICOM: {exc.reason}") from None
    return Image.fromarray(np.round(window_hu(hu, window).numpy()).astype(np.uint8), "L")


def describe(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, window: Window = LUNG_WINDOW, dicom: bool = False
) -> ImageInfo:
    """Describe an encoded image or DICOM CT slice, or raise :class:`InvalidImage` saying why it cannot be used.

    DICOM is recognised by content; ``dicom=True`` (a ``.dcm`` name) reads the file as DICOM regardless.
    """
    if dicom or is_dicom(data):
        gray = _windowed(data, max_pixels, window)
        fmt, mode, (width, height) = DICOM_FORMAT, HU_MODE, gray.size
    else:
        fmt, mode, width, height = _header(data, max_pixels)
        pixels = _decode(data)
        if mode in _GRAY_MODES:
            gray = Image.fromarray(np.ascontiguousarray(pixels[..., 0]), "L")
        else:
            gray = Image.fromarray(pixels, "RGB").convert("L")
    counts = np.asarray(gray.histogram(), dtype=np.float64)  # 256 bins: exact sums, no per-pixel float copy
    levels = np.arange(256, dtype=np.float64)
    n = counts.sum()
    mean = float(counts @ levels / n)
    std = float(np.sqrt(max(counts @ levels**2 / n - mean**2, 0.0)))
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        phash=str(imagehash.phash(gray)),
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        brightness_mean=round(mean, 4),
        brightness_std=round(std, 4),
    )


def inspect_image(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, window: Window = LUNG_WINDOW) -> ImageInfo:
    """Read ``path`` once, decode it fully and describe it, or raise :class:`InvalidImage`.

    The pixel cap is checked from the header, before any pixel is decoded.
    """
    result = _inspect_path(str(path), max_pixels, window=window)  # in this process: one file is not worth a worker
    if isinstance(result, InvalidImage):
        raise result
    return result


def _inspect_path(
    path: str, max_pixels: int, copy_to: str | None = None, window: Window = LUNG_WINDOW
) -> ImageInfo | InvalidImage:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_file_bytes(max_pixels):
                return InvalidImage(
                    f"file is {size} bytes, more than an uncompressed image at the pixel cap "
                    f"({max_file_bytes(max_pixels)} bytes)",
                    path,
                )
            data = fh.read()
    except OSError as exc:
        return InvalidImage(f"cannot read the file: {exc.strerror or exc}", path)
    try:
        info = describe(data, max_pixels=max_pixels, window=window, dicom=Path(path).suffix.lower() in DICOM_SUFFIXES)
    except InvalidImage as exc:
        return InvalidImage(exc.reason, path)
    if copy_to:  # the bytes validated and hashed, not a later re-read of a file that may have changed
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        Path(copy_to).write_bytes(data)  # an error here is the machine's (disk full), not the file's: it propagates
    return info


def _inspect_chunk(
    jobs: list[tuple[str, str | None]], max_pixels: int, window: Window = LUNG_WINDOW
) -> list[ImageInfo | InvalidImage]:
    return [_inspect_path(path, max_pixels, copy_to, window) for path, copy_to in jobs]


def _crashed(job: tuple[str, str | None]) -> InvalidImage:
    return InvalidImage(
        "the decoder crashed its worker process (a signal such as a segfault, or out of memory)", job[0]
    )


def _init_worker() -> None:
    """One TensorFlow thread per worker: the pool already uses every core."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime was initialised already (spawn fallback that imported it first)
        pass


def inspect_files(
    paths: Sequence[Path | str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    copy_to: Sequence[Path | str | None] | None = None,
    window: Window = LUNG_WINDOW,
) -> list[ImageInfo | InvalidImage]:
    """Inspect every file, in input order: an :class:`ImageInfo`, or the :class:`InvalidImage`
    (with ``path`` and ``reason``) that says why the file cannot be used. Never raises for bad files.

    ``workers``: worker processes; ``None`` means every CPU the container may use
    (:func:`chest_ct.parallel.available_cpus`). A file that crashes the decoder in a
    worker is quarantined instead of ending the run. ``0`` runs in this process (no
    such isolation; for debugging), which then imports TensorFlow itself.
    ``window``: how DICOM slices are described (the window the model will see them through).
    ``copy_to``: for each path, where to write its bytes when it is valid (``None``: nowhere).
    The copy is the bytes that were hashed and decoded, written by the worker that read
    them, so each file is read once and a file changing under the run cannot slip in.
    A progress line (count, rate, ETA) is logged every few seconds on long runs.
    """
    names = [str(p) for p in paths]
    targets = [None if t is None else str(t) for t in copy_to] if copy_to is not None else [None] * len(paths)
    if len(targets) != len(paths):
        raise ValueError(f"copy_to has {len(targets)} entries for {len(names)} paths")
    jobs = list(zip(names, targets, strict=True))
    workers = available_cpus() if workers is None else max(0, int(workers))
    progress = Progress("validated images", len(jobs))
    if workers == 0:
        results = []
        for path, target in jobs:
            results.append(_inspect_path(path, max_pixels, target, window))
            progress.update(1)
    else:
        results = process_map(
            functools.partial(_inspect_chunk, max_pixels=max_pixels, window=window),
            jobs,
            workers=workers,
            on_crash=_crashed,
            preload=WORKER_PRELOAD,
            initializer=_init_worker,
            progress=progress,
        )
    progress.finish()
    return results
