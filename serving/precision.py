"""Reduced precision for the model's forward pass: when to use it, and the parity guard that may refuse it.

VGG16's convolutions in bfloat16 run about twice as fast as in float32 on CPUs with
native bf16 instructions (AVX512-BF16, AMX), with pooled features within ~0.35% of
float32. The served SavedModel is rewritten to bf16 at load time by TensorFlow's oneDNN
grappler pass ``auto_mixed_precision_onednn_bfloat16`` (the graph in the model folder
is float32 and stays so); the ops the model asks to keep in float32 (its metadata's
``precision_guard.keep_float32_ops``: the head's MatMul, so the probability is not
rounded to bf16's 8-bit mantissa) are taken off the rewrite's allow list.

A clinical answer must never change unnoticed, so reduced precision is used only
after the model's *golden set* (a few images stored with the model and their float32
probabilities, written at export) gives the same answers: every probability within
the tolerance and no label flipped at the model's threshold. Otherwise the server
serves float32 and says why.

Nothing here imports TensorFlow or ``chest_ct``: the training side
(:mod:`chest_ct.precision`) uses the same detection and comparison, so evaluation
reports agreement exactly as the server's guard measures it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUTO, FP32, BF16 = "auto", "fp32", "bf16"
CHOICES = (AUTO, FP32, BF16)
#: "0" or "1": overrides the CPU feature detection (a node whose kernel hides the flags; tests of ``auto``).
CPU_BF16_ENV = "CHEST_CT_CPU_BF16"
#: /proc/cpuinfo flags of native bf16 arithmetic (AVX512-BF16 on Cooper Lake / Zen 4+, AMX on Sapphire Rapids+).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: oneDNN runs bf16 graphs on any AVX512F CPU, emulated (slower than float32) without the flags above.
ONEDNN_BF16_FLAG = "avx512f"
GRAPPLER_OPTION = "auto_mixed_precision_onednn_bfloat16"
#: Ops named here are left in float32 by the rewrite (TensorFlow reads it when it optimizes a graph).
KEEP_FLOAT32_ENV = "TF_AUTO_MIXED_PRECISION_GRAPH_REWRITE_ALLOWLIST_REMOVE"


def check_choice(name: str, value: str) -> str:
    if value not in CHOICES:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU does bf16 natively, whether oneDNN can run bf16 at all, and how that was found out."""

    native: bool
    runnable: bool
    source: str


def cpu_bf16(environ: Mapping[str, str] = os.environ, cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuBf16:
    """This CPU's bf16 support, from ``CHEST_CT_CPU_BF16`` when set, else from /proc/cpuinfo's flags."""
    forced = environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1")
        return CpuBf16(forced == "1", forced == "1", f"{CPU_BF16_ENV}={forced}")
    try:
        flags = {
            flag
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()
        }
    except OSError:
        return CpuBf16(False, False, f"{cpuinfo} unreadable")
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    return CpuBf16(
        bool(native),
        bool(native) or ONEDNN_BF16_FLAG in flags,
        f"{cpuinfo}: {', '.join(native) if native else 'no ' + '/'.join(NATIVE_BF16_FLAGS)}",
    )


def serving_precision(requested: str, cpu: CpuBf16, gpus: int = 0) -> tuple[str, str]:
    """(``fp32`` or ``bf16``, why) for the server; the golden set may still refuse bf16."""
    check_choice("precision", requested)
    if requested == FP32:
        return FP32, "fp32 requested"
    if gpus:
        return FP32, f"{gpus} GPU(s) visible: the oneDNN bf16 rewrite applies to CPU kernels only"
    if requested == BF16:
        if not cpu.runnable:
            return FP32, f"bf16 requested but oneDNN cannot run bf16 on this CPU ({cpu.source}, no {ONEDNN_BF16_FLAG})"
        return BF16, "bf16 requested" + ("" if cpu.native else f" (emulated, likely slower: {cpu.source})")
    if cpu.native:
        return BF16, f"auto: native bf16 ({cpu.source})"
    return FP32, f"auto: no native bf16 on this CPU ({cpu.source})"


@dataclass(frozen=True)
class Parity:
    """How a reduced-precision run agrees with the float32 reference on the same images."""

    images: int
    max_abs_diff: float
    mean_abs_diff: float
    label_flips: int
    tolerance: float
    threshold: float

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.max_abs_diff <= self.tolerance and self.label_flips == 0

    def describe(self) -> str:
        return (
            f"{self.images} image(s): max |p_reduced - p_fp32| = {self.max_abs_diff:.2g} "
            f"(tolerance {self.tolerance:g}), {self.label_flips} label flip(s) at threshold {self.threshold:.4f}"
        )

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "images": self.images,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "label_flips": self.label_flips,
            "tolerance": self.tolerance,
            "threshold": self.threshold,
            "within_tolerance": self.ok,
        }


def parity(
    reference: Sequence[float] | np.ndarray, reduced: Sequence[float] | np.ndarray, threshold: float, tolerance: float
) -> Parity:
    """Compare probabilities; a label flips when the two sit on different sides of ``threshold`` (``>=``)."""
    ref, red = np.asarray(reference, np.float64).reshape(-1), np.asarray(reduced, np.float64).reshape(-1)
    if ref.shape != red.shape:
        raise ValueError(f"{len(red)} reduced-precision probabilities for {len(ref)} reference ones")
    diff = np.abs(ref - red)
    bad = ~np.isfinite(red)
    return Parity(
        images=len(ref),
        max_abs_diff=float(np.max(np.where(bad, np.inf, diff), initial=0.0)),
        mean_abs_diff=float(diff[~bad].mean()) if (~bad).any() else float("nan"),
        label_flips=int(np.sum((ref >= threshold) != (red >= threshold))),
        tolerance=float(tolerance),
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class PrecisionState:
    """What the server runs in, what was asked for, why, and what the golden set showed (if it ran)."""

    requested: str
    precision: str
    reason: str
    golden: Parity | None = None
    #: bf16 was chosen but refused: no usable golden set, or it disagreed.
    fell_back: bool = False

    def parameters(self) -> dict[str, str | float | int | bool]:
        """For the model's v2 metadata (scalar values only)."""
        out: dict[str, str | float | int | bool] = {
            "precision": self.precision,
            "precision_requested": self.requested,
            "precision_reason": self.reason,
            "precision_fell_back": self.fell_back,
        }
        if self.golden is not None:
            out.update(
                golden_images=self.golden.images,
                golden_max_abs_diff=self.golden.max_abs_diff,
                golden_label_flips=self.golden.label_flips,
                golden_tolerance=self.golden.tolerance,
            )
        return out


def settle_precision(
    runner, golden, golden_problem: str, threshold: float, requested: str, tolerance: float, cpu: CpuBf16, gpus: int = 0
) -> PrecisionState:
    """Choose the precision, prove bf16 on the golden set, and leave ``runner`` in the precision to serve.

    ``runner`` has ``set_precision(precision, keep_float32_ops)`` and ``predict_images(list[bytes])``;
    ``golden`` is the model's :class:`serving.model_dir.GoldenSet` or None (``golden_problem`` says why).
    """
    chosen, reason = serving_precision(requested, cpu, gpus)
    if chosen == FP32:
        runner.set_precision(FP32)
        return PrecisionState(requested, FP32, reason)
    if golden is None:
        runner.set_precision(FP32)
        return PrecisionState(requested, FP32, f"{reason}, but {golden_problem}: serving fp32", fell_back=True)
    runner.set_precision(BF16, golden.keep_float32_ops)
    try:
        reduced = runner.predict_images(golden.read_images())["probability"]
    except Exception as exc:  # noqa: BLE001  (an unreadable or undecodable golden image: the guard cannot vouch)
        runner.set_precision(FP32)
        return PrecisionState(
            requested,
            FP32,
            f"{reason}, but the golden set could not be run in bf16 ({type(exc).__name__}: {exc}): serving fp32",
            fell_back=True,
        )
    check = parity(golden.probabilities, reduced, threshold, tolerance)
    if not check.ok:
        runner.set_precision(FP32)
        return PrecisionState(
            requested,
            FP32,
            f"{reason}, but the golden set disagrees in bf16 ({check.describe()}): serving fp32",
            check,
            fell_back=True,
        )
    return PrecisionState(requested, BF16, f"{reason}; golden set agrees ({check.describe()})", check)
