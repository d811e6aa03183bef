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
def exported_model(root: str, size: int = IMAGE_SIZE) -> Path:
    """Export a tiny random-weight model once per test process under ``root``; return its directory.

    Its out-of-distribution guard is fitted on :func:`ct_like` slices in the lung window, so
    such slices are in distribution, and photos, flat images or random colours are not.
    ``size``: the model's input size (its heatmap grid is ``size // 16`` a side).
    """
    from chest_ct.export import export_saved_model
    from chest_ct.model import build_model
    from chest_ct.ood import block_features, fit_guard

    out = Path(root) / ("chest-ct-model" if size == IMAGE_SIZE else f"chest-ct-model-{size}px")
    if not (out / "saved_model.pb").is_file():
        import keras

        keras.utils.set_random_seed(7)
        model = build_model(size, "none")
        folder = Path(root) / "guard-images"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(40):
            files.append(folder / f"ct{i}.png")
            files[-1].write_bytes(encode(lung_window(ct_like(1000 + i, size=48 + i % 3 * 16, nodule=i % 2 == 0))))
        guard = fit_guard(block_features(model, [str(f) for f in files], size, 8), list(range(len(files))))
        export_saved_model(model, out, {"mlflow_run_id": RUN_ID, "dataset_fingerprint": "sha256:test"}, guard=guard)
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
        return self.outputs("images", encoded)["probability"]

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs("pixels", np.asarray(pixels, np.float32))["probability"]

    def hu(self, hu: np.ndarray) -> np.ndarray:
        return self.outputs("hu", np.asarray(hu, np.float32))["probability"]

    def outputs(self, kind: str, values, explain: bool = False) -> dict[str, np.ndarray]:
        """Every output of the signature for ``kind`` (images, pixels or hu); ``explain``: its explain signature."""
        name = {"images": "serving_default", "pixels": "serve_pixels", "hu": "serve_hu"}[kind]
        if explain:
            name = {"images": "explain_images", "pixels": "explain_pixels", "hu": "explain_hu"}[kind]
        dtype = self._tf.string if kind == "images" else self._tf.float32
        out = self._loaded.signatures[name](**{kind: self._tf.constant(values, dtype=dtype)})
        return {k: v.numpy() for k, v in out.items()}


# --- images ------------------------------------------------------------------------------------


def ct_like(seed: int, size: int = 64, nodule: bool = False) -> np.ndarray:
    """A synthetic axial chest CT slice in Hounsfield units (float32): body, two lungs, spine, table.

    A nodule (soft tissue in a lung) is what the positive class carries in synthetic datasets.
    """
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    hu = np.full((size, size), -1000.0)
    cx, cy = 0.5 + rng.normal(0, 0.02), 0.48 + rng.normal(0, 0.02)
    ax, ay = 0.42 + rng.normal(0, 0.02), 0.30 + rng.normal(0, 0.02)
    hu[((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1] = 40.0
    hu[(yy > cy + ay + 0.03) & (yy < cy + ay + 0.07) & (abs(xx - 0.5) < 0.45)] = 150.0  # the table
    for side in (-1, 1):
        lx, lax, lay = (
            cx + side * ax * 0.45,
            ax * 0.35 * (1 + rng.normal(0, 0.05)),
            ay * 0.7 * (1 + rng.normal(0, 0.05)),
        )
        hu[((xx - lx) / lax) ** 2 + ((yy - cy + 0.02) / lay) ** 2 < 1] = -850.0
    hu[((xx - cx) / 0.05) ** 2 + ((yy - cy - ay * 0.75) / 0.05) ** 2 < 1] = 700.0  # the spine
    if nodule:
        nx, ny = cx + rng.choice([-1, 1]) * ax * 0.45 + rng.normal(0, 0.03), cy + rng.normal(0, 0.05)
        hu[(xx - nx) ** 2 + (yy - ny) ** 2 < (0.04 + 0.02 * rng.random()) ** 2] = 30.0
    return (hu + rng.normal(0, 15, hu.shape)).astype(np.float32)


def lung_window(hu: np.ndarray, level: float = -600.0, width: float = 1500.0) -> np.ndarray:
    """HU -> 8-bit grey, as a viewer exports a slice in a window."""
    return np.round(np.clip((hu - (level - width / 2)) * 255.0 / width, 0, 255)).astype(np.uint8)


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
            [
                sys.executable,
                "-m",
                "serving",
                "--model_dir",
                str(model_dir),
                "--model_name",
                MODEL_NAME,
                "--http_port",
                str(self.http_port),
                "--grpc_port",
                str(self.grpc_port),
                *extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

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


def run_server_expecting_failure(
    model_dir: str | Path, *extra_args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``python -m serving`` where startup must fail; return the finished process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--model_dir",
            str(model_dir),
            "--http_port",
            str(free_port()),
            "--grpc_port",
            str(free_port()),
            *extra_args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_subprocess(code: str, payload: dict, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter with ``payload`` as the global ``PAYLOAD``; return its ``RESULT``.

    Needed for tritonclient.grpc: it and kserve register the same protobuf
    names ('inference.*'), so the two cannot be imported into one process.
    """
    wrapper = (
        "import json, sys\nPAYLOAD = json.loads(sys.stdin.read())\nRESULT = {}\n"
        + code
        + "\nprint('@@RESULT@@' + json.dumps(RESULT))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        raise AssertionError(
            f"client subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(marker[-1][len("@@RESULT@@") :])


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
    """A tiny SavedModel with the serving signatures; probability = mean intensity / 255 of each image
    (``serve_hu``: mean HU / 1000 + 1, clipped), ``ood_score`` = 2 x probability, so images brighter than the
    ``ood`` threshold 1.5 (mean intensity over 191) are out of distribution.

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
        probs = tf.cond(
            tf.reduce_any(tf.equal(markers, EXTRA_RESULT)), lambda: tf.concat([probs, [0.5]], 0), lambda: probs
        )
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(tf.equal(markers, INPUT_ERROR))), ["an image carries the input-error marker"]
        )
        with tf.control_dependencies([check]):
            probs = tf.identity(probs)
            return {"probability": probs, "ood_score": 2.0 * probs, "in_distribution": 2.0 * probs <= 1.5}

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

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
        def hu(self, hu):
            means = tf.clip_by_value(tf.reduce_mean(hu, axis=[1, 2]) / 1000.0 + 1.0, 0.0, 1.0) * 255.0
            return steer(means, tf.zeros_like(means))

    module = Steerable()
    out = root / "steerable-model"
    tf.saved_model.save(
        module,
        str(out),
        signatures={"serving_default": module.images, "serve_pixels": module.pixels, "serve_hu": module.hu},
    )
    (out / "model_metadata.json").write_text(
        json.dumps(
            {
                "class_names": ["normal", "adenocarcinoma"],
                "positive_class": "adenocarcinoma",
                "image_size": 8,
                "threshold": 0.5,
                "mlflow_run_id": version,
                "ood": {"threshold": 1.5},
                "window": {"level": -600.0, "width": 1500.0},
            }
        )
    )
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
