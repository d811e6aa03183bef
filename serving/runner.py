"""The SavedModel's signatures as plain, synchronous numpy functions.

This is the only module that imports TensorFlow. One call here is one
SavedModel call: ``serving.batching`` sizes the chunks (by images and pixels).
Each call returns one record per image (:data:`OUTPUT_DTYPE`: the probability and
the out-of-distribution guard's ``ood_score`` and ``in_distribution``), a 1-D numpy
structured array that slices and concatenates like the plain probabilities did.
With ``explain=True`` the input kind's explain signature runs instead and each
record also holds the image's Grad-CAM ``heatmap`` (a float32 ``[h, w]`` field,
:func:`explain_dtype`). TensorFlow's ``InvalidArgumentError`` is the only error
treated as the input's fault (``ModelInputError``); every other error (out of
memory, internal errors) propagates as it is.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.model_dir import BYTES_SIGNATURE, EXPLAIN_SIGNATURES, HU_SIGNATURE, PIXELS_SIGNATURE, ModelLoadError
from serving.precision import BF16, FP32, GRAPPLER_OPTION, KEEP_FLOAT32_ENV

BYTES_ARG = "images"
PIXELS_ARG = "pixels"
HU_ARG = "hu"
OUTPUT_KEY = "probability"
#: One record per image: what every signature returns.
OUTPUT_DTYPE = np.dtype([("probability", "<f4"), ("ood_score", "<f4"), ("in_distribution", "?")])
OUTPUT_NAMES: tuple[str, ...] = OUTPUT_DTYPE.names or ()  # a structured dtype always has names
HEATMAP_KEY = "heatmap"


def explain_dtype(grid: tuple[int, int]) -> np.dtype:
    """One record per image of an explain call: :data:`OUTPUT_DTYPE` plus the ``[h, w]`` heatmap."""
    return np.dtype([*OUTPUT_DTYPE.descr, (HEATMAP_KEY, "<f4", tuple(grid))])


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
    """Loads the SavedModel and calls ``serving_default`` / ``serve_pixels`` / ``serve_hu`` on numpy data.

    The explain signatures (``explain_images`` / ``explain_pixels`` / ``explain_hu``) are used when the
    model has all three (``has_explain``); a model exported before them is served without heatmaps.
    """

    def __init__(self, model_dir: str | Path):
        tf = import_tensorflow()

        self._tf = tf
        #: TensorFlow's intra-/inter-op pool sizes when set from the container's CPU limit, else None.
        self.tf_threads = fit_threads_to_cpu_limit(tf)
        try:
            self._loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:  # TF raises many types (OSError, DecodeError, InvalidArgumentError...)
            raise ModelLoadError(
                f"TensorFlow cannot load the SavedModel in {model_dir}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        signatures = getattr(self._loaded, "signatures", {})
        self._bytes_fn = _signature(signatures, BYTES_SIGNATURE, BYTES_ARG, tf.string, 1, model_dir)
        self._pixels_fn = _signature(signatures, PIXELS_SIGNATURE, PIXELS_ARG, tf.float32, 4, model_dir)
        self._hu_fn = _signature(signatures, HU_SIGNATURE, HU_ARG, tf.float32, 3, model_dir)
        explain = [name for name in EXPLAIN_SIGNATURES.values() if name in signatures]
        self._explain: dict[str, object] = {}
        if explain:  # all three or none: a partial set is a broken export, not an older one
            self._explain = {
                BYTES_ARG: _signature(
                    signatures, EXPLAIN_SIGNATURES[BYTES_SIGNATURE], BYTES_ARG, tf.string, 1, model_dir, (HEATMAP_KEY,)
                ),
                PIXELS_ARG: _signature(
                    signatures,
                    EXPLAIN_SIGNATURES[PIXELS_SIGNATURE],
                    PIXELS_ARG,
                    tf.float32,
                    4,
                    model_dir,
                    (HEATMAP_KEY,),
                ),
                HU_ARG: _signature(
                    signatures, EXPLAIN_SIGNATURES[HU_SIGNATURE], HU_ARG, tf.float32, 3, model_dir, (HEATMAP_KEY,)
                ),
            }
        self.precision = FP32

    @property
    def has_explain(self) -> bool:
        """Whether the model can return ``heatmap`` (it has the explain signatures)."""
        return bool(self._explain)

    def set_precision(self, precision: str, keep_float32_ops: Sequence[str] = ()) -> None:
        """Run the signatures in ``fp32`` or ``bf16`` (oneDNN's grappler rewrite) from the next call on.

        TensorFlow optimizes a function again when the optimizer options change (they are part of
        its cache key), so switching back to fp32 after a failed golden check needs no reload. The
        option is process-wide: this process serves one model.
        """
        if precision == BF16 and keep_float32_ops:
            os.environ[KEEP_FLOAT32_ENV] = ",".join(keep_float32_ops)
        self._tf.config.optimizer.set_experimental_options({GRAPPLER_OPTION: precision == BF16})
        self.precision = precision

    def gpus(self) -> int:
        return len(self._tf.config.list_physical_devices("GPU"))

    def predict_images(self, encoded: Sequence[bytes], explain: bool = False) -> np.ndarray:
        """Outputs for encoded PNG/JPEG files (one call); with ``explain``, the heatmap too."""
        try:
            return self._call(self._fn(BYTES_ARG, self._bytes_fn, explain), BYTES_ARG, list(encoded), explain)
        except self._tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"the model rejected the images: {_tf_message(exc)}") from exc

    def first_undecodable(self, encoded: Sequence[bytes]) -> tuple[int, str] | None:
        """(index, TensorFlow's reason) of the first file the model cannot decode on its own, or None."""
        for i, one in enumerate(encoded):
            try:
                self._call(self._bytes_fn, BYTES_ARG, [one], False)
            except self._tf.errors.InvalidArgumentError as exc:
                return i, _tf_message(exc)
        return None

    def predict_pixels(self, pixels: np.ndarray, explain: bool = False) -> np.ndarray:
        """Outputs for float32 RGB pixels ``[N, H, W, 3]`` in 0..255 (one call); with ``explain``, the heatmap too."""
        try:
            return self._call(
                self._fn(PIXELS_ARG, self._pixels_fn, explain),
                PIXELS_ARG,
                np.asarray(pixels, dtype=np.float32),
                explain,
            )
        except self._tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"the model rejected the pixels: {_tf_message(exc)}") from exc

    def predict_hu(self, hu: np.ndarray, explain: bool = False) -> np.ndarray:
        """Outputs for CT slices in Hounsfield units, float32 ``[N, H, W]`` (one call; the window is in the graph)."""
        try:
            return self._call(self._fn(HU_ARG, self._hu_fn, explain), HU_ARG, np.asarray(hu, dtype=np.float32), explain)
        except self._tf.errors.InvalidArgumentError as exc:
            raise ModelInputError(f"the model rejected the slices: {_tf_message(exc)}") from exc

    def _fn(self, arg: str, predict, explain: bool):
        if not explain:
            return predict
        if not self._explain:
            raise RuntimeError("the model has no explain signatures")  # the predictor refuses such requests first
        return self._explain[arg]

    def _call(self, fn, arg: str, values, explain: bool) -> np.ndarray:
        dtype = self._tf.string if arg == BYTES_ARG else self._tf.float32
        out = fn(**{arg: self._tf.constant(values, dtype=dtype)})
        columns = {name: np.asarray(out[name].numpy()).reshape(-1) for name in OUTPUT_NAMES}
        n = len(columns[OUTPUT_KEY])
        record = OUTPUT_DTYPE
        if explain:
            heatmap = np.asarray(out[HEATMAP_KEY].numpy(), dtype=np.float32)
            if heatmap.ndim != 3:
                raise RuntimeError(f"the model returned a heatmap of shape {heatmap.shape}; expected [N, h, w]")
            columns[HEATMAP_KEY] = heatmap
            record = explain_dtype((heatmap.shape[1], heatmap.shape[2]))
        if any(len(c) != n for c in columns.values()):
            raise RuntimeError(
                f"the model returned outputs of different lengths: { {k: len(c) for k, c in columns.items()} }"
            )
        records = np.empty(n, dtype=record)
        for name, column in columns.items():
            records[name] = column
        return records


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
        sys.modules[name] = None  # type: ignore[assignment]  # None makes ``import name`` raise ImportError
    try:
        import tensorflow as tf
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return tf


def container_cpus() -> int:
    """CPUs this process may use: the least of the machine's, its affinity and the container's CPU quota.

    joblib's (loky's) ``cpu_count`` reads the quota of cgroup v2 (``cpu.max``) and v1
    (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; kserve's own helper reads only v1.
    ``LOKY_MAX_CPU_COUNT`` lowers it further.
    """
    import joblib

    return max(1, int(joblib.cpu_count()))


def fit_threads_to_cpu_limit(tf) -> int | None:
    """Size TensorFlow's thread pools to the container's CPU limit; return the size set, or None.

    TensorFlow sizes its pools from the CPUs it can see, which in a pod are the node's (say 32), not
    the Kubernetes ``limits.cpu`` (a CFS quota, 2 in manifests/base/inferenceservice.yaml). 32 busy
    threads use up a 2-CPU quota early in each scheduling period and the whole process is then
    throttled until the next: slower and more erratic model calls (in a 1-CPU cgroup on 2 cores,
    16 threads gave a batch-1 p50 of 301 ms and p90 up to 363 ms; 1 thread 280-289 ms and 285-305 ms).
    TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS, when set, take precedence. Without a limit below
    the visible CPUs (as on a plain machine) nothing changes.
    """
    cpus = container_cpus()
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus >= visible:
        return None
    setters = [
        setter
        for env, setter in (
            ("TF_NUM_INTRAOP_THREADS", tf.config.threading.set_intra_op_parallelism_threads),
            ("TF_NUM_INTEROP_THREADS", tf.config.threading.set_inter_op_parallelism_threads),
        )
        if not os.environ.get(env)
    ]
    try:
        for setter in setters:
            setter(cpus)
    except RuntimeError:  # TensorFlow already ran something in this process: its pools are fixed
        return None
    return cpus if setters else None


def _signature(signatures, name: str, arg: str, dtype, rank: int, model_dir, extra_outputs: tuple[str, ...] = ()):
    if name not in signatures:
        raise ModelLoadError(
            f"the SavedModel in {model_dir} has no '{name}' signature "
            f"(found: {sorted(signatures.keys())}); re-export it with chest_ct.export"
        )
    fn = signatures[name]
    _, kwargs = fn.structured_input_signature
    spec = kwargs.get(arg)
    if spec is None or spec.dtype != dtype or spec.shape.rank != rank:
        raise ModelLoadError(
            f"signature '{name}' of {model_dir} must take '{arg}' as {dtype.name} of rank {rank}, but takes {kwargs}"
        )
    expected = [*OUTPUT_NAMES, *extra_outputs]
    missing = [key for key in expected if key not in fn.structured_outputs]
    if missing:
        raise ModelLoadError(
            f"signature '{name}' of {model_dir} must return {expected}, "
            f"returns {sorted(fn.structured_outputs)} (a model exported before the "
            "out-of-distribution guard existed: re-export it)"
        )
    return fn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tf_message(exc) -> str:
    """TF's reason for an input error, one line of at most 200 characters, without graph internals.

    Node names, "Detected at node ... defined at" stack headers and node dumps say nothing to a client.
    """
    message = getattr(exc, "message", None) or str(exc)
    internal = ("[[", "Detected at node", "<stack traces", "File ", "Graph execution error")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(internal)]
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", " ".join(lines)).strip()
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)
