"""Reduced precision in training, and how an exported model's answers change under it.

The train step's costly part is VGG16's forward pass over every image (the frozen
feature pass) and, when asked, fine-tuning its last block. ``precision`` (``auto``,
``fp32``, ``bf16``) chooses the Keras dtype policy of VGG16's convolution and pooling
layers for both:

- CPU: ``mixed_bfloat16`` when the CPU has native bf16 (AVX512-BF16 or AMX), else
  float32. oneDNN runs the bf16 convolutions about twice as fast as float32 ones.
- GPU: ``mixed_bfloat16`` from compute capability 8.0 (Ampere), ``mixed_float16``
  from 7.0 (Volta, Turing: fine-tuning then scales the loss), float32 below.

Variables stay float32 and so do the pooled features and the head (the sigmoid's
output is float32): only the convolutions are cheaper. The exported SavedModel is
always float32; the server chooses its own precision at load (``serving.precision``),
guarded by the golden set written with the model (:mod:`chest_ct.golden`).

Two mechanisms were verified here. TensorFlow's oneDNN grappler pass
(``auto_mixed_precision_onednn_bfloat16``, :func:`onednn_bf16`) rewrites any graph it
optimizes: Keras ``predict`` and a loaded SavedModel's signatures alike, and since
the option is part of a function's cache key, switching it back gives float32 again
without reloading. A Keras dtype policy changes only the layers it is set on. VGG16 at
224 px, batch 32, on this 2-core AVX512-BF16 machine: both ran ``predict`` at 24.7
images/s with features within 0.35% of float32 (mean relative difference). Training
uses the policy: it is scoped to VGG16's layers (the grappler option is process-wide
and would also rewrite the head's fitting) and it is what GPUs use. Serving, which has
only the SavedModel, uses the rewrite; so does :func:`precision_agreement`, which
evaluation uses to report what a bf16 server would answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from chest_ct import defaults
from serving.model_dir import GUARD_KEY
from serving.precision import (
    AUTO,
    BF16,
    FP32,
    GRAPPLER_OPTION,
    KEEP_FLOAT32_ENV,
    CpuBf16,
    check_choice,
    cpu_bf16,
    parity,
)

log = logging.getLogger(__name__)

FLOAT32, MIXED_BF16, MIXED_FP16 = "float32", "mixed_bfloat16", "mixed_float16"
__all__ = [
    "AUTO",
    "BF16",
    "FLOAT32",
    "FP32",
    "MIXED_BF16",
    "MIXED_FP16",
    "PrecisionChoice",
    "check_choice",
    "choose_precision",
    "conv_policy",
    "gpu_policy",
    "onednn_bf16",
    "precision_agreement",
]


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision the train step uses, what was asked for, on what device, and why."""

    requested: str
    policy: str
    device: str
    reason: str

    @property
    def reduced(self) -> bool:
        return self.policy != FLOAT32

    @property
    def loss_scale(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        return self.policy == MIXED_FP16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpu_policy(capabilities: Sequence[tuple[int, int]]) -> tuple[str, str]:
    """The mixed policy the slowest of these GPUs (CUDA compute capabilities) runs fastest, and why."""
    lowest = min(capabilities)
    shown = f"{lowest[0]}.{lowest[1]}"
    if lowest >= (8, 0):
        return MIXED_BF16, f"GPU compute capability {shown} >= 8.0: bf16 tensor cores"
    if lowest >= (7, 0):
        return MIXED_FP16, f"GPU compute capability {shown} (7.x): fp16 tensor cores, no bf16"
    return FLOAT32, f"GPU compute capability {shown} < 7.0: no tensor cores, mixed precision would not be faster"


def visible_gpu_capabilities() -> list[tuple[int, int]]:
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        found.append((int(capability[0]), int(capability[1])))
    return found


def choose_precision(
    requested: str = defaults.PRECISION, gpus: Sequence[tuple[int, int]] | None = None, cpu: CpuBf16 | None = None
) -> PrecisionChoice:
    """The dtype policy for VGG16's layers. ``gpus``: compute capabilities (default: TensorFlow's visible GPUs)."""
    check_choice("precision", requested)
    gpus = visible_gpu_capabilities() if gpus is None else list(gpus)
    device = f"{len(gpus)} GPU(s)" if gpus else "CPU"
    if requested == FP32:
        return PrecisionChoice(requested, FLOAT32, device, "fp32 requested")
    if gpus:
        policy, why = gpu_policy(gpus)
        if requested == BF16 and policy == FLOAT32:
            return PrecisionChoice(
                requested,
                MIXED_FP16,
                device,
                f"bf16 requested; {why} (fp16, the GPU's reduced type, works but may not be faster)",
            )
        return PrecisionChoice(requested, policy, device, f"{requested}: {why}")
    cpu = cpu or cpu_bf16()
    if requested == BF16:
        note = "" if cpu.native else f" (emulated without native bf16, likely slower: {cpu.source})"
        return PrecisionChoice(requested, MIXED_BF16, device, "bf16 requested" + note)
    if cpu.native:
        return PrecisionChoice(requested, MIXED_BF16, device, f"auto: native bf16 ({cpu.source})")
    return PrecisionChoice(requested, FLOAT32, device, f"auto: no native bf16 on this CPU ({cpu.source})")


def _forget_traces(*models: keras.Model) -> None:
    """Keras keeps each model's traced train/test/predict functions: drop them so the next call sees new dtypes."""
    for model in models:
        model.train_function = model.test_function = model.predict_function = None


@contextmanager
def conv_policy(base: keras.Model, policy: str, *users: keras.Model) -> Iterator[None]:
    """Inside the block, ``base``'s layers compute in ``policy``, except the last one (the pooling, float32).

    ``users`` are models that contain ``base`` (their traced functions are dropped too).
    Restored on exit, whatever happens; variables are float32 throughout.
    """
    if policy == FLOAT32:
        yield
        return
    layers = [layer for layer in base.layers[:-1] if not isinstance(layer, keras.layers.InputLayer)]
    before = [layer.dtype_policy for layer in layers]
    for layer in layers:
        layer.dtype_policy = policy
    _forget_traces(base, *users)
    try:
        yield
    finally:
        for layer, original in zip(layers, before, strict=True):
            layer.dtype_policy = original
        _forget_traces(base, *users)


@contextmanager
def onednn_bf16(keep_float32_ops: Sequence[str] = ()) -> Iterator[None]:
    """SavedModel signatures called inside the block are rewritten to bf16 by oneDNN's grappler pass.

    What ``serving`` does at load; ``keep_float32_ops`` are left in float32 (the model's
    metadata names them). The option is process-wide: it is restored on exit, and
    TensorFlow optimizes a function again when the option changes.
    """
    before_option = tf.config.optimizer.get_experimental_options().get(GRAPPLER_OPTION, False)
    before_env = os.environ.get(KEEP_FLOAT32_ENV)
    if keep_float32_ops:
        os.environ[KEEP_FLOAT32_ENV] = ",".join(keep_float32_ops)
    tf.config.optimizer.set_experimental_options({GRAPPLER_OPTION: True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({GRAPPLER_OPTION: before_option})
        if before_env is None:
            os.environ.pop(KEEP_FLOAT32_ENV, None)
        else:
            os.environ[KEEP_FLOAT32_ENV] = before_env


def precision_agreement(
    model_dir: Path, files: Sequence[str], threshold: float, tolerance: float = defaults.PRECISION_TOLERANCE
) -> dict[str, Any]:
    """The exported model's float32 and bf16 probabilities on ``files`` compared, as the server's guard compares.

    Reported by evaluation on its split whatever this machine's own choice would be, so the
    figures hold for a bf16 server elsewhere; skipped only where oneDNN cannot run bf16 at all.
    """
    from chest_ct.export import read_metadata
    from chest_ct.predict import predict_outputs

    cpu = cpu_bf16()
    if not cpu.runnable:
        return {"skipped": f"oneDNN cannot run bf16 on this CPU ({cpu.source})", "native_bf16": False}
    keep = (read_metadata(model_dir).get(GUARD_KEY) or {}).get("keep_float32_ops") or []
    fp32 = predict_outputs(model_dir, files)
    with onednn_bf16(keep):
        reduced = predict_outputs(model_dir, files)
    result = parity(fp32["probability"], reduced["probability"], threshold, tolerance)
    log.info("fp32 vs bf16 on %s", result.describe())
    guard = {}
    if "in_distribution" in fp32 and "in_distribution" in reduced:  # the guard's answer may flip too
        guard = {
            "guard_flips": int(np.sum(fp32["in_distribution"] != reduced["in_distribution"])),
            "ood_score_max_rel_diff": float(
                np.max(
                    np.abs(fp32["ood_score"] - reduced["ood_score"]) / np.maximum(np.abs(fp32["ood_score"]), 1e-6),
                    initial=0.0,
                )
            ),
        }
    return {**result.to_dict(), **guard, "precision": BF16, "native_bf16": cpu.native, "cpu": cpu.source}
