"""Dockerfile.serve and serving/requirements.txt: lint-clean, pinned, and only what serving needs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.serve"
REQUIREMENTS = REPO / "serving" / "requirements.txt"


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s;]+)", line)
        assert match, f"requirement not pinned with ==: {line!r}"
        pins[match.group(1)] = match.group(3)
    return pins


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed")
def test_dockerfile_passes_hadolint_without_findings():
    proc = subprocess.run(
        [_hadolint(), "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_runs_as_numeric_non_root_user_with_healthcheck_and_pinned_base():
    text = DOCKERFILE.read_text().replace("\\\n", " ")  # join continuation lines
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    assert re.search(r"^HEALTHCHECK\s+(--\S+\s+)*CMD", text, flags=re.MULTILINE)
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    assert "MODEL_DIR=/mnt/models" in text
    assert not re.search(r"(curl|wget)[^\n]*\|\s*(ba)?sh", text)


def test_requirements_are_pinned_to_the_versions_tested_here():
    pins = _pins()
    for name in ("kserve", "tensorflow-cpu", "pillow", "numpy"):
        assert name in pins, f"{name} missing from {REQUIREMENTS}"
    mismatched = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"pinned vs installed: {mismatched}"


def test_requirements_leave_out_training_only_packages():
    pins = {name.lower() for name in _pins()}
    assert not pins & {"mlflow", "kfp", "kfp-kubernetes", "chest-ct", "scikit-learn", "matplotlib", "gdown", "boto3"}


def test_serving_never_imports_the_training_library():
    for path in (REPO / "serving").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "chest_ct" or n.startswith("chest_ct.") for n in names), f"{path.name} imports {names}"
