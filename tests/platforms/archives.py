"""The platform packages `make test` downloads into .venv-platforms/ (see requirements-platforms.lock)."""

from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path

import pytest

PLATFORMS = Path(__file__).resolve().parents[2] / ".venv-platforms"


def archive(project: str, version: str) -> Path:
    """The downloaded wheel or sdist of ``project==version``; skips with the fix when absent."""
    stem = re.sub(r"[-_.]+", "[-_]", project)
    for path in sorted(PLATFORMS.glob("*")):
        if re.fullmatch(rf"{stem}-{re.escape(version)}(-py3-none-any\.whl|\.tar\.gz)", path.name, re.IGNORECASE):
            return path
    pytest.skip(
        f"{project}=={version} is not in {PLATFORMS.name}/: run `make test` (it downloads "
        "requirements-platforms.lock) or the same pip download by hand"
    )


def read_member(path: Path, suffix: str) -> str:
    """The text of the one member of a wheel/sdist whose name ends with ``suffix``."""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            [name] = [n for n in wheel.namelist() if n.endswith(suffix)]
            return wheel.read(name).decode()
    with tarfile.open(path) as sdist:
        [name] = [n for n in sdist.getnames() if n.endswith(suffix)]
        member = sdist.extractfile(name)
        assert member is not None
        return member.read().decode()


def members(path: Path, prefix: str) -> dict[str, str]:
    """Text of every member of a wheel under ``prefix`` (e.g. kserve/models/)."""
    with zipfile.ZipFile(path) as wheel:
        return {n: wheel.read(n).decode() for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".py")}
