"""The container's CPU count, which sizes TensorFlow's thread pools and the event loop's executor in a pod.

``serving.runner.container_cpus`` relies on joblib (loky), which reads the CFS quota
of cgroup v2 (``/sys/fs/cgroup/cpu.max``) and v1 (``/sys/fs/cgroup/cpu/cpu.cfs_*``).
These tests give a child process its own mount namespace with those files at their
real paths, so the library is exercised on the files a container would show it.
They need root (CAP_SYS_ADMIN) for ``unshare -m``; they skip clearly without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "from serving.runner import container_cpus; print(container_cpus())"


def _cpus_with(setup: str) -> int:
    script = f"mount -t tmpfs tmpfs /sys/fs/cgroup && {setup} && exec {sys.executable} -c '{PROBE}'"
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    if proc.returncode != 0 and ("Operation not permitted" in proc.stderr or "unshare failed" in proc.stderr):
        pytest.skip(f"cannot make a private mount namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1) to fake the cgroup files"
)


def visible_cpus() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_cpu_max():
    assert _cpus_with("echo '100000 100000' > /sys/fs/cgroup/cpu.max") == 1
    assert _cpus_with("echo 'max 100000' > /sys/fs/cgroup/cpu.max") == visible_cpus()


def test_cgroup_v1_cfs_quota():
    v1 = (
        "mkdir /sys/fs/cgroup/cpu && echo {} > /sys/fs/cgroup/cpu/cpu.cfs_quota_us && "
        "echo 100000 > /sys/fs/cgroup/cpu/cpu.cfs_period_us"
    )
    assert _cpus_with(v1.format(50000)) == 1  # half a CPU rounds up to one
    assert _cpus_with(v1.format(-1)) == visible_cpus()  # -1: no quota


def test_no_cgroup_files_means_the_visible_cpus():
    assert _cpus_with("true") == visible_cpus()
