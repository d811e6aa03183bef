"""bench.ingest, part 2: the synthetic dataset (grayscale PNG 'slices' with planted exact and near copies)."""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path


def synthetic_png(index: int, size: int) -> bytes:
    """A smooth random 'slice' (a few random cosine waves) plus noise, grayscale PNG; distinct phash per index."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(6):
        fy, fx = rng.uniform(0.5, 6, 2)
        field += rng.uniform(0.5, 1.5) * np.cos(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    pixels = (128 + 35 * field + rng.normal(0, 6, field.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


def near_copy(data: bytes) -> bytes:
    """The same picture with a thin bright line on it, like the marked copies in the real data."""
    import numpy as np
    from PIL import Image

    pixels = np.array(Image.open(io.BytesIO(data)))
    pixels[len(pixels) // 3, :] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


def _write_images(job: tuple[str, int, int, int]) -> None:
    folder, start, stop, size = job
    for i in range(start, stop):
        (Path(folder) / f"{i:07d}.png").write_bytes(synthetic_png(i, size))


def make_dataset(root: Path, n: int, size: int, workers: int) -> dict[str, list[tuple[str, str]]]:
    """``n`` PNGs in two class folders; the last 10% are exact (half) and near (half) copies of earlier ones."""
    classes = ["adenocarcinoma", "normal"]
    originals = n - n // 10
    jobs = []
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        lo, hi = c * originals // 2, (c + 1) * originals // 2
        jobs += [(str(root / label), s, min(s + 500, hi), size) for s in range(lo, hi, 500)]
    # fork: this process has not imported TensorFlow, and the forkserver is kept for the measured pools
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_write_images, jobs)
    files = sorted(root.rglob("*.png"))
    pairs: dict[str, list[tuple[str, str]]] = {"exact": [], "near": []}
    for k in range(n - originals):
        src = files[(k * 7919) % len(files)]
        kind = "exact" if k % 2 == 0 else "near"
        dst = src.with_name(f"{src.stem}-{kind}{k}.png")
        dst.write_bytes(src.read_bytes() if kind == "exact" else near_copy(src.read_bytes()))
        pairs[kind].append((src.relative_to(root).as_posix(), dst.relative_to(root).as_posix()))
    return pairs
