"""Helpers for the serving tests: a tiny exported model, test images, and the real server in a subprocess."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "chest-ct"
IMAGE_SIZE = 32
RUN_ID = "test-run-0123456789"


# --- model -------------------------------------------------------------------------------------

@cache
def exported_model(root: str) -> Path:
    """Export a tiny random-weight model once per test process under ``root``; return its directory."""
    from chest_ct.export import export_saved_model
    from chest_ct.model import build_model

    out = Path(root) / "chest-ct-model"
    if not (out / "saved_model.pb").is_file():
        export_saved_model(build_model(IMAGE_SIZE, "none"), out,
                           {"mlflow_run_id": RUN_ID, "dataset_fingerprint": "sha256:test"})
    return out


def golden_model(root: str) -> Path:
    """A copy of :func:`exported_model` carrying a golden set of six test images (chest_ct.golden)."""
    import shutil

    from chest_ct.golden import write_golden_set

    out = Path(root) / "chest-ct-model-golden"
    if not (out / "golden").is_dir():
        shutil.copytree(exported_model(root), out, dirs_exist_ok=True)
        write_golden_set(out, [encode(rgb(IMAGE_SIZE, IMAGE_SIZE, seed=100 + i)) for i in range(6)], "test images")
    return out


def set_threshold(model_dir: Path, threshold: float) -> None:
    path = model_dir / "model_metadata.json"
    meta = json.loads(path.read_text())
    meta["threshold"] = float(threshold)
    meta["threshold_source"] = "test: median of the test images' probabilities"
    path.write_text(json.dumps(meta, indent=2))


class InProcessModel:
    """The SavedModel called directly, the reference the server's answers must match."""

    def __init__(self, model_dir: Path):
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(str(model_dir))

    def images(self, encoded: list[bytes]) -> np.ndarray:
        fn = self._loaded.signatures["serving_default"]
        return fn(images=self._tf.constant(encoded, dtype=self._tf.string))["probability"].numpy()

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        fn = self._loaded.signatures["serve_pixels"]
        return fn(pixels=self._tf.constant(np.asarray(pixels, np.float32)))["probability"].numpy()


# --- images ------------------------------------------------------------------------------------

def rgb(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (compresses like a scan, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def encode(array_or_image, fmt: str = "PNG", **kwargs) -> bytes:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def length_prefixed(elements: list[bytes]) -> bytes:
    """The v2 binary wire format of a BYTES tensor."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# --- server ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m serving`` on free loopback ports; ``stop()`` always ends it."""

    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str, env: dict[str, str] | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--model_dir", str(model_dir), "--model_name", MODEL_NAME,
             "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port), *extra_args],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, tail: int = 5000) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/v2/models/{MODEL_NAME}/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        self._log.close()


def run_server_expecting_failure(model_dir: str | Path, *extra_args: str,
                                 timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m serving`` where startup must fail; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "serving", "--model_dir", str(model_dir), "--http_port", str(free_port()),
         "--grpc_port", str(free_port()), *extra_args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_in_subprocess(code: str, payload: dict, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter with ``payload`` as the global ``PAYLOAD``; return its ``RESULT``.

    Needed for tritonclient.grpc: it and kserve register the same protobuf
    names ('inference.*'), so the two cannot be imported into one process.
    """
    wrapper = ("import json, sys\nPAYLOAD = json.loads(sys.stdin.read())\nRESULT = {}\n" + code +
               "\nprint('@@RESULT@@' + json.dumps(RESULT))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], input=json.dumps(payload), capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        raise AssertionError(f"client subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return json.loads(marker[-1][len("@@RESULT@@"):])


# --- a steerable model for overload and failure tests ------------------------------------------

#: The red value of an image's top-left pixel steers the steerable model's call for its batch.
GATE_2, GATE, INTERNAL_ERROR, EXTRA_RESULT, INPUT_ERROR = 250, 251, 252, 253, 254
#: A path the internal-error branch reads; it must never reach a client.
SECRET_PATH = "/nonexistent/chest-ct-internal/secret-path.bin"


class Gate:
    """A named pipe the steerable model writes to when a batch holds a GATE image.

    Opening a FIFO for writing blocks until a reader opens it, so such a model call
    waits (in TensorFlow's WriteFile op) until ``release()``: the test decides when
    the model is busy and for how long, without timing assumptions.
    """

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)

    def release(self) -> None:
        """Let the model call that is writing to the gate (if any) finish."""
        import fcntl

        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            while os.read(fd, 4096):  # until the writer closes (EOF at once if no writer)
                pass
        finally:
            os.close(fd)


def steerable_model(root: Path, *, version: str = "") -> tuple[Path, Gate, Gate]:
    """A tiny SavedModel with the serving signatures; probability = mean intensity / 255 of each image.

    A batch holding an image whose top-left red value is GATE (GATE_2) blocks on the first (second)
    returned gate;
    INTERNAL_ERROR raises NotFoundError (reads SECRET_PATH); EXTRA_RESULT returns one result
    too many; INPUT_ERROR fails an assertion (InvalidArgumentError, an input error).
    """
    import tensorflow as tf

    root.mkdir(parents=True, exist_ok=True)
    gates = Gate(root / "gate.fifo"), Gate(root / "gate2.fifo")

    def steer(means: tf.Tensor, markers: tf.Tensor) -> tf.Tensor:
        probs = means / 255.0

        def blocked(gate: Gate):
            def wait():
                with tf.control_dependencies([tf.io.write_file(str(gate.path), "released")]):
                    return tf.identity(probs)
            return wait

        def failing():
            return probs + 0.0 * tf.cast(tf.strings.length(tf.io.read_file(SECRET_PATH)), tf.float32)

        probs = tf.cond(tf.reduce_any(tf.equal(markers, GATE)), blocked(gates[0]), lambda: probs)
        probs = tf.cond(tf.reduce_any(tf.equal(markers, GATE_2)), blocked(gates[1]), lambda: probs)
        probs = tf.cond(tf.reduce_any(tf.equal(markers, INTERNAL_ERROR)), failing, lambda: probs)
        probs = tf.cond(tf.reduce_any(tf.equal(markers, EXTRA_RESULT)),
                        lambda: tf.concat([probs, [0.5]], 0), lambda: probs)
        check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(tf.equal(markers, INPUT_ERROR))),
                                    ["an image carries the input-error marker"])
        with tf.control_dependencies([check]):
            return {"probability": tf.identity(probs)}

    class Steerable(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def images(self, images):
            def one(encoded):
                img = tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32)
                return tf.stack([tf.reduce_mean(img), img[0, 0, 0]])

            stats = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([2], tf.float32))
            return steer(stats[:, 0], stats[:, 1])

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
        def pixels(self, pixels):
            return steer(tf.reduce_mean(pixels, axis=[1, 2, 3]), pixels[:, 0, 0, 0])

    module = Steerable()
    out = root / "steerable-model"
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.images,
                                                      "serve_pixels": module.pixels})
    (out / "model_metadata.json").write_text(json.dumps({
        "class_names": ["normal", "adenocarcinoma"], "positive_class": "adenocarcinoma", "image_size": 8,
        "threshold": 0.5, "mlflow_run_id": version}))
    return out, gates[0], gates[1]


def marked_png(marker: int | None, height: int = 16, width: int = 16, seed: int = 0) -> bytes:
    """A PNG whose top-left red value is ``marker`` (None: an ordinary image for the steerable model)."""
    pixels = rgb(height, width, seed).copy()
    pixels[0, 0, 0] = marker if marker is not None else min(int(pixels[0, 0, 0]), 200)
    return encode(pixels, "PNG")


def steerable_probability(png: bytes) -> float:
    """What the steerable model answers for an ordinary PNG."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32).mean() / 255.0)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """A sample of the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, what: str, timeout: float = 60.0, server: ServerProcess | None = None) -> None:
    """Poll ``condition()`` until true; fail with ``what`` (and the server log) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{server.log()}" if server else ""))
