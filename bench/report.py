"""Shared bits of the benchmark scripts: the table, the machine line, docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import ParamSpec, TypeVar

PROJECT = Path(__file__).resolve().parents[1]
DOC = PROJECT / "docs" / "benchmarks.md"
SHARED_DATA = PROJECT.parent / "shared" / "data" / "chest-ct"
WEIGHTS_DIR = PROJECT.parent / "shared" / "data" / "weights"

P = ParamSpec("P")
T = TypeVar("T")


def timed(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[float, T]:
    """Seconds ``fn(*args, **kwargs)`` took, and what it returned."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(
        f"{p} {version(p)}"
        for p in ("tensorflow", "tensorflow-cpu", "keras", "kserve", "mlflow", "kfp")
        if _installed(p)
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), GPU: {gpus()}, Python {platform.python_version()}, {versions}; "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def gpus() -> str:
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    return ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in found) or "none"


def _installed(package: str) -> bool:
    try:
        version(package)
        return True
    except Exception:
        return False


def pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of ``values``."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def vgg16_weights() -> str:
    """ImageNet VGG16 (no top) from ../shared/data/weights when present, else random (same speed)."""
    found = sorted(WEIGHTS_DIR.glob("*vgg16*notop*.h5")) if WEIGHTS_DIR.is_dir() else []
    return str(found[0]) if found else "none"


def write_section(name: str, body: str) -> None:
    """Replace the ``name`` section of docs/benchmarks.md (between its markers) with ``body``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = (
        DOC.read_text()
        if DOC.exists()
        else "# Benchmarks\n\nWritten by the `bench/` scripts (`make bench`); do not edit by hand.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def emit(figures: dict) -> None:
    print(json.dumps(figures), flush=True)


def publish(section: str, title: str, body: str, figures: dict, *, write: bool, machine_note: str = "") -> None:
    """How every benchmark ends: its section of docs/benchmarks.md (unless ``write`` is off), then the JSON line.

    The section: the ``title`` heading, the machine line (plus ``machine_note``), ``body``, the figures as JSON.
    """
    if write:
        write_section(
            section,
            f"## {title}\n\nMachine: {machine()}{machine_note}\n\n{body}\n\n```json\n{json.dumps(figures)}\n```",
        )
    emit(figures)
