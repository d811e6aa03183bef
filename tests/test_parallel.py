"""The process pool: CPU count from the container's limits, order, crash isolation, progress lines."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chest_ct.parallel import Progress, WorkerStartError, available_cpus, process_map

PROJECT = Path(__file__).resolve().parents[1]


# --- worker functions (module level: the workers import them by name) ----------------------------


def double(chunk: list[int]) -> list[int]:
    return [2 * x for x in chunk]


def crash_on_13_and_segfault_on_29(chunk: list[int]) -> list[int]:
    out = []
    for x in chunk:
        if x == 13:
            os._exit(3)  # the worker vanishes, as under the OOM killer
        if x == 29:
            os.kill(os.getpid(), signal.SIGSEGV)  # a real segfault signal, as from a broken decoder
        out.append(2 * x)
    return out


def raise_on_7(chunk: list[int]) -> list[int]:
    if 7 in chunk:
        raise ValueError("a bug, not bad input")
    return chunk


def die_at_start() -> None:
    os._exit(1)


def crashed(x: int) -> str:
    return f"crashed on {x}"


# --- CPU count -----------------------------------------------------------------------------------


def cpus_in(command_prefix: list[str], env: dict | None = None) -> int:
    code = "from chest_ct.parallel import available_cpus; print(available_cpus())"
    out = subprocess.run(
        [*command_prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})},
        cwd=PROJECT,
    )
    return int(out.stdout.strip())


def test_cpu_count_follows_affinity_and_loky_override():
    assert 1 <= available_cpus() <= min(os.cpu_count(), len(os.sched_getaffinity(0)))  # less under a CPU limit
    assert cpus_in([], {"LOKY_MAX_CPU_COUNT": "1"}) == 1
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"):
        pytest.skip("needs 2 CPUs and taskset")
    assert cpus_in(["taskset", "-c", "0"]) == 1


def can_unshare() -> bool:
    return (
        bool(shutil.which("unshare"))
        and subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False).returncode == 0
    )


needs_unshare = pytest.mark.skipif(
    not can_unshare(), reason="needs root and unshare(1) to give a process its own mounts"
)


@needs_unshare
@pytest.mark.parametrize("cpu_max, expected", [("50000 100000", 1), ("250000 100000", 3), ("max 100000", None)])
def test_cpu_count_reads_the_cgroup_v2_limit(cpu_max, expected):
    """A container sees its own cgroup at /sys/fs/cgroup: give a process that view, cpu.max as the kernel writes it."""
    script = (
        'd=$(mktemp -d) && mount -t tmpfs none "$d" && printf "%s\\n" "$CPU_MAX" > "$d/cpu.max" '
        '&& mount --bind "$d" /sys/fs/cgroup && exec "$@"'
    )
    got = cpus_in(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"], {"CPU_MAX": cpu_max})
    machine = min(os.cpu_count(), len(os.sched_getaffinity(0)))
    assert got == (min(expected, machine) if expected else machine)


@needs_unshare
def test_cpu_count_reads_a_real_cgroup_v1_quota():
    """A real cgroup v1 with a CFS quota of half a CPU, mounted where a container sees it."""
    cpu_root = Path("/sys/fs/cgroup/cpu")
    if not (cpu_root / "cpu.cfs_quota_us").exists() or not os.access(cpu_root, os.W_OK):
        pytest.skip("no writable cgroup v1 cpu hierarchy here")
    group = cpu_root / f"chest-ct-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("50000")
        script = f'echo $$ > {group}/cgroup.procs && mount --bind {group} {cpu_root} && exec "$@"'
        assert cpus_in(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]) == 1
    finally:
        group.rmdir()


# --- process_map ---------------------------------------------------------------------------------


def test_results_come_back_in_input_order():
    items = list(range(1000))
    assert process_map(double, items, workers=2, on_crash=crashed, chunk_size=7) == [2 * x for x in items]
    assert process_map(double, [], workers=2, on_crash=crashed) == []


def test_a_crashing_item_is_isolated_and_the_rest_still_done(caplog):
    items = list(range(60))
    with caplog.at_level(logging.WARNING, logger="chest_ct.parallel"):
        out = process_map(crash_on_13_and_segfault_on_29, items, workers=2, on_crash=crashed, chunk_size=8)
    expected = [2 * x for x in items]
    expected[13], expected[29] = "crashed on 13", "crashed on 29"
    assert out == expected
    assert "a worker process died" in caplog.text


def test_workers_that_cannot_start_are_an_error_not_a_quarantine():
    with pytest.raises(WorkerStartError, match="die before doing any work"):
        process_map(double, list(range(10)), workers=2, on_crash=crashed, initializer=die_at_start)


def test_bugs_in_the_worker_function_propagate():
    with pytest.raises(ValueError, match="a bug, not bad input"):
        process_map(raise_on_7, list(range(20)), workers=2, on_crash=crashed, chunk_size=3)


# --- progress ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_have_count_rate_and_eta(caplog):
    clock = Clock()
    progress = Progress("validated images", 1000, every_s=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="chest_ct.parallel"):
        clock.now = 2
        progress.update(100)  # too soon for a line
        clock.now = 10
        progress.update(150)  # 250 in 10 s: 25/s, 750 left: 30 s
        clock.now = 12
        progress.update(10)  # too soon again
        clock.now = 100
        progress.update(740)
        progress.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "validated images: 250/1000 (25/s, ETA 30s)",
        "validated images: 1000/1000 in 1m40s (10/s)",
    ]


def test_short_runs_log_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="chest_ct.parallel"):
        progress = Progress("validated images", 10, every_s=5)
        progress.update(10)
        progress.finish()
    assert caplog.records == []
