"""Every server setting in one place (the limits, the precision): its default, flag, environment variable, check.

Each field of ``ServerConfig`` is a flag ``--<name>`` whose default is the
environment variable ``CHEST_CT_<NAME>`` when set (an InferenceService can tune
a limit without replacing the container's args), else the field's default.
How each default was derived, and what a client sees when it is hit, is in
serving/README.md ("Limits").
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

from serving.precision import AUTO, CHOICES

MiB = 1024 * 1024
#: Largest image accepted (pixels): 4096 x 4096, far above a CT slice (512 x 512) yet a bounded decode.
CAP_PIXELS = 4096 * 4096
_TYPES = {"int": int, "float": float, "str": str}


def _limit(default: float, text: str, low: float, high: float | None = None) -> Any:
    return field(default=default, metadata={"help": text, "low": low, "high": high})


def _choice(default: str, text: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"help": text, "choices": choices})


@dataclass(frozen=True)
class ServerConfig:
    # --- one request ------------------------------------------------------------------------
    max_request_bytes: int = _limit(
        32 * MiB,
        "largest REST body (also after gzip/deflate decompression) and gRPC message; over it: 413 / RESOURCE_EXHAUSTED",
        1024,
    )
    max_images: int = _limit(64, "most images (N) per request; over it: 400 / INVALID_ARGUMENT", 1)
    max_image_pixels: int = _limit(
        CAP_PIXELS, "most pixels (width x height) per image, read from the header before decoding; over it: 400", 1
    )
    # --- one model call ---------------------------------------------------------------------
    max_batch_size: int = _limit(
        2,
        "most images per model call: larger requests are split into chunks of this size that take turns "
        "with other requests; concurrent smaller ones are merged",
        1,
        1024,
    )
    max_call_pixels: int = _limit(
        CAP_PIXELS, "most decoded pixels per model call (an image over it still gets a call of its own)", 1
    )
    max_batch_wait_ms: float = _limit(
        0.0,
        "how long a request may wait for others to share its model call; 0 merges only requests that "
        "queued while the model was busy",
        0.0,
        10_000.0,
    )
    # --- admission: work accepted and not yet answered ----------------------------------------
    max_queued_images: int = _limit(
        2,
        "most images waiting for a model call (each admitted request has at most one chunk waiting); "
        "a request that does not fit: 503 + Retry-After / UNAVAILABLE",
        1,
    )
    max_queued_pixels: int = _limit(
        3 * CAP_PIXELS,
        "most decoded pixels of the images of admitted, unanswered requests (memory); "
        "a request that does not fit: 503 / UNAVAILABLE",
        1,
    )
    max_inflight_bytes: int = _limit(
        128 * MiB,
        "most request-body bytes held at once by requests being read or served; "
        "a body that does not fit: 503 / UNAVAILABLE before it is read",
        1024,
    )
    # --- time -------------------------------------------------------------------------------
    deadline_ms: float = _limit(
        30_000.0,
        "longest a request may take from arrival to answer; clients may ask for less (gRPC deadline, "
        "request parameter 'timeout' in microseconds); past it: 504 / DEADLINE_EXCEEDED",
        1.0,
        3_600_000.0,
    )
    model_call_timeout_s: float = _limit(
        60.0,
        "a model call running longer than this makes /v2/health/ready and the model's ready endpoint "
        "answer not ready until it ends (watchdog)",
        0.1,
        86_400.0,
    )
    # --- numerics (serving/precision.py) -------------------------------------------------------
    precision: str = _choice(
        AUTO,
        "the model's arithmetic: auto (bf16 when the CPU has native bf16, else fp32), fp32 or bf16; "
        "bf16 is used only if the model's golden set agrees with its stored float32 answers",
        CHOICES,
    )
    precision_tolerance: float = _limit(
        0.01,
        "largest difference from the stored float32 probability a golden image may show in reduced "
        "precision (any label flip at the threshold also falls back to fp32)",
        0.0,
        1.0,
    )

    def __post_init__(self) -> None:
        bad = []
        for f in fields(self):
            if "choices" in f.metadata:
                if getattr(self, f.name) not in f.metadata["choices"]:
                    bad.append(f"{f.name}={getattr(self, f.name)!r} (allowed: {', '.join(f.metadata['choices'])})")
                continue
            value, low, high = getattr(self, f.name), f.metadata["low"], f.metadata["high"]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < low
                or (high is not None and value > high)
                or (f.type == "int" and value != int(value))
            ):
                bad.append(f"{f.name}={value!r} (allowed: {low}..{'' if high is None else high})")
        if bad:
            raise ValueError(f"invalid server settings: {'; '.join(bad)}")

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0


def env_name(name: str) -> str:
    return f"CHEST_CT_{name.upper()}"


def _env_default(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(env_name(name), "").strip()
    if not raw:
        return default
    if kind is str:
        return raw
    try:
        number = float(raw)
    except ValueError:
        raise SystemExit(f"chest-ct serving: environment variable {env_name(name)}={raw!r} is not a number") from None
    return int(number) if kind is int and number == int(number) else number


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<name>`` flag per ServerConfig field, its default read from ``CHEST_CT_<NAME>`` when set.

    A choice read from the environment is checked with the other values (``from_args``), so a wrong
    ``CHEST_CT_PRECISION`` gets the same one-line refusal as a wrong limit.
    """
    for f in fields(ServerConfig):
        kind = _TYPES[str(f.type)]
        default = f.default if kind is str else float(f.default)  # type: ignore[arg-type]
        parser.add_argument(
            f"--{f.name}",
            type=kind,
            default=_env_default(f.name, kind, kind(default)),
            help=f"{f.metadata['help']} (env {env_name(f.name)})",
        )


def from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed flags; ValueError names every value out of range."""
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
