"""The server under benchmark as a process: spawn, readiness, resident memory, the pod's memory limit, restarts.

Part of ``bench.serve``. The sampler emulates the kubelet: a server whose resident
memory (process and children) passes the pod's memory limit is killed, as the
OOM killer would, and ``respawn()`` starts it again on the same ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.report import PROJECT

MODEL_NAME = "chest-ct"
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def pod_memory_limit() -> int:
    """The model server's memory limit in the InferenceService the deploy step writes, in bytes."""
    from chest_ct.inference_service import DEFAULT_RESOURCES

    text = str(DEFAULT_RESOURCES["limits"]["memory"])
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m serving`` on free loopback ports, with a peak-RSS sampler; ``stop()`` always ends it."""

    def __init__(self, model_dir: Path, log_path: Path, extra: list[str], memory_limit: int | None = None):
        self.http_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.model_dir, self.extra, self.memory_limit = model_dir, extra, memory_limit
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (kept open for the server's lifetime, closed in stop())
        self.peak_rss = 0
        self.oom_kills = 0
        self._stop = threading.Event()
        self._spawn()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _spawn(self) -> None:
        import psutil

        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                "--model_dir",
                str(self.model_dir),
                "--model_name",
                MODEL_NAME,
                "--http_port",
                str(self.http_port),
                "--grpc_port",
                str(self.grpc_port),
                *self.extra,
            ],
            cwd=PROJECT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._ps = psutil.Process(self.proc.pid)

    def respawn(self, timeout: float = 120.0) -> None:
        """Start the server again after it died (an OOM kill or a crash) and wait until it is ready."""
        self._kill()
        self._spawn()
        self.wait_ready(timeout)

    def procs(self) -> list:
        import psutil

        try:
            return [self._ps, *self._ps.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> int:
        import psutil

        total = 0
        for p in self.procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            rss = self.rss()
            self.peak_rss = max(self.peak_rss, rss)
            if self.memory_limit and rss > self.memory_limit and self.proc.poll() is None:
                self.oom_kills += 1  # what the kubelet's OOM killer would do at the pod's limit
                self._kill()

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn until /v2/health/ready answers 200."""
        import requests

        deadline = time.perf_counter() + timeout
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if session.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                        return time.perf_counter() - self.spawned
                except requests.RequestException:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self._kill()
        self._log.close()
