"""The SavedModel's two signatures as plain, synchronous numpy functions.

This is the only module that imports TensorFlow. Calls are split into chunks of
at most ``max_batch_size`` images so one large request cannot allocate
activations for, say, 64 images at once; the chunking does not change the
results because the model has no cross-example operations.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.model_dir import BYTES_SIGNATURE, PIXELS_SIGNATURE, ModelLoadError

BYTES_ARG = "images"
PIXELS_ARG = "pixels"
OUTPUT_KEY = "probability"

#: Packages that ``import tensorflow`` pulls in through Keras only when they happen to be installed
#: (scikit-learn wrappers, a SciPy sparse check, matplotlib plotting); each such import is guarded by
#: ``except ImportError``. Serving needs none of them and the serving image does not install them, but
#: in the project venv they add about 1.5 s to startup and 90 MB of memory.
UNUSED_OPTIONAL_IMPORTS = ("sklearn", "scipy", "matplotlib")


class ModelInputError(ValueError):
    """TensorFlow rejected an input the validation let through (e.g. an image Pillow reads but TF cannot)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class SavedModelRunner:
    """Loads the SavedModel and calls ``serving_default`` / ``serve_pixels`` on numpy data."""

    def __init__(self, model_dir: str | Path, max_batch_size: int = 8):
        tf = import_tensorflow()

        self._tf = tf
        #: TensorFlow's intra-/inter-op pool sizes when set from the container's CPU limit, else None.
        self.tf_threads = fit_threads_to_cpu_limit(tf)
        self.max_batch_size = max(1, int(max_batch_size))
        try:
            self._loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:  # TF raises many types (OSError, DecodeError, InvalidArgumentError...)
            raise ModelLoadError(f"TensorFlow cannot load the SavedModel in {model_dir}: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
        signatures = getattr(self._loaded, "signatures", {})
        self._bytes_fn = _signature(signatures, BYTES_SIGNATURE, BYTES_ARG, tf.string, 1, model_dir)
        self._pixels_fn = _signature(signatures, PIXELS_SIGNATURE, PIXELS_ARG, tf.float32, 4, model_dir)

    def predict_images(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded PNG/JPEG files; ModelInputError names the first file TF cannot decode."""
        try:
            return self._chunked(self._bytes_fn, BYTES_ARG, lambda lo, hi: list(encoded[lo:hi]), len(encoded))
        except self._tf.errors.InvalidArgumentError as exc:
            for i, one in enumerate(encoded):  # find the culprit so the error can name it
                try:
                    self._call(self._bytes_fn, BYTES_ARG, [one])
                except self._tf.errors.InvalidArgumentError as one_exc:
                    raise ModelInputError(f"element {i} cannot be decoded as an image: "
                                          f"{_tf_message(one_exc)}", index=i) from one_exc
            raise ModelInputError(f"the model rejected the images: {_tf_message(exc)}") from exc

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for float32 RGB pixels ``[N, H, W, 3]`` in 0..255."""
        pixels = np.asarray(pixels, dtype=np.float32)
        try:
            return self._chunked(self._pixels_fn, PIXELS_ARG, lambda lo, hi: pixels[lo:hi], len(pixels))
        except self._tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"the model rejected the pixels: {_tf_message(exc)}") from exc

    def _chunked(self, fn, arg: str, chunk, n: int) -> np.ndarray:
        parts = [self._call(fn, arg, chunk(lo, min(lo + self.max_batch_size, n)))
                 for lo in range(0, n, self.max_batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def _call(self, fn, arg: str, values) -> np.ndarray:
        dtype = self._tf.string if arg == BYTES_ARG else self._tf.float32
        out = fn(**{arg: self._tf.constant(values, dtype=dtype)})[OUTPUT_KEY].numpy()
        return np.asarray(out, dtype=np.float32).reshape(-1)


def import_tensorflow():
    """``import tensorflow``, without letting Keras import the optional packages serving never uses.

    They are hidden only while TensorFlow is first imported, and only if not already imported:
    anything that imports them afterwards gets them as usual.
    """
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    hidden = [name for name in UNUSED_OPTIONAL_IMPORTS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # makes ``import name`` raise ImportError
    try:
        import tensorflow as tf
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return tf


def fit_threads_to_cpu_limit(tf) -> int | None:
    """Size TensorFlow's thread pools to the container's CPU limit; return the size set, or None.

    TensorFlow sizes its pools from the CPUs it can see, which in a pod are the node's (say 32), not
    the Kubernetes ``limits.cpu`` (a CFS quota, 2 in manifests/base/inferenceservice.yaml). 32 busy
    threads use up a 2-CPU quota early in each scheduling period and the whole process is then
    throttled until the next: slower and more erratic model calls (in a 1-CPU cgroup on 2 cores,
    16 threads gave a batch-1 p50 of 301 ms and p90 up to 363 ms; 1 thread 280-289 ms and 285-305 ms).
    TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS, when set, take precedence. Without a quota below
    the visible CPUs (as on a plain machine) nothing changes.
    """
    quota = cpu_quota()
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quota is None or math.ceil(quota) >= visible:
        return None
    threads = max(1, math.ceil(quota))
    setters = [setter for env, setter in (
        ("TF_NUM_INTRAOP_THREADS", tf.config.threading.set_intra_op_parallelism_threads),
        ("TF_NUM_INTEROP_THREADS", tf.config.threading.set_inter_op_parallelism_threads),
    ) if not os.environ.get(env)]
    try:
        for setter in setters:
            setter(threads)
    except RuntimeError:  # TensorFlow already ran something in this process: its pools are fixed
        return None
    return threads if setters else None


def cpu_quota() -> float | None:
    """This process's cgroup CPU limit in CPUs (v2 ``cpu.max`` or v1 CFS quota), or None when unlimited."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2: "max 100000" or "<quota> <period>"
            for base in {Path("/sys/fs/cgroup") / path, Path("/sys/fs/cgroup")}:
                found.append(_ratio(base / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for base in {Path("/sys/fs/cgroup", mount, path), Path("/sys/fs/cgroup", mount)}:
                    found.append(_ratio(base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    limits = [q for q in found if q is not None]
    return min(limits) if limits else None


def _ratio(quota_file: Path, period_file: Path | None = None) -> float | None:
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _signature(signatures, name: str, arg: str, dtype, rank: int, model_dir):
    if name not in signatures:
        raise ModelLoadError(f"the SavedModel in {model_dir} has no '{name}' signature "
                             f"(found: {sorted(signatures.keys())}); re-export it with chest_ct.export")
    fn = signatures[name]
    _, kwargs = fn.structured_input_signature
    spec = kwargs.get(arg)
    if spec is None or spec.dtype != dtype or spec.shape.rank != rank:
        raise ModelLoadError(f"signature '{name}' of {model_dir} must take '{arg}' as {dtype.name} "
                             f"of rank {rank}, but takes {kwargs}")
    if OUTPUT_KEY not in fn.structured_outputs:
        raise ModelLoadError(f"signature '{name}' of {model_dir} must return '{OUTPUT_KEY}', "
                             f"returns {sorted(fn.structured_outputs)}")
    return fn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tf_message(exc) -> str:
    """TF's error text without the graph node dump that follows the first line."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith("[[")]
    text = " ".join(lines)
    return text.replace("Graph execution error:", "").strip()[:300] or type(exc).__name__
