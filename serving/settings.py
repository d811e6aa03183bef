"""Server limits and batching settings, with defaults overridable by flag or environment variable.

Environment variables exist so an InferenceService can tune the limits
without replacing the container's arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from serving.validation import Limits

MiB = 1024 * 1024

#: Flag name -> (environment variable, default).
ENV_DEFAULTS: dict[str, tuple[str, float]] = {
    "max_request_bytes": ("CHEST_CT_MAX_REQUEST_BYTES", 32 * MiB),
    "max_images": ("CHEST_CT_MAX_IMAGES", 64),
    "max_image_pixels": ("CHEST_CT_MAX_IMAGE_PIXELS", 4096 * 4096),
    "max_batch_size": ("CHEST_CT_MAX_BATCH_SIZE", 8),
    "max_batch_wait_ms": ("CHEST_CT_MAX_BATCH_WAIT_MS", 0.0),
}


def env_default(name: str) -> float:
    """The default for flag ``name``: its environment variable if set, else the built-in value."""
    env, default = ENV_DEFAULTS[name]
    value = os.environ.get(env)
    if value is None or value.strip() == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"chest-ct serving: environment variable {env}={value!r} is not a number") from None
    return int(number) if isinstance(default, int) else number


@dataclass(frozen=True)
class ServingSettings:
    #: Largest request body accepted over REST (after decompression) and gRPC message size.
    max_request_bytes: int = int(ENV_DEFAULTS["max_request_bytes"][1])
    limits: Limits = field(default_factory=Limits)
    #: Most images per SavedModel call; larger requests are split, smaller concurrent ones merged.
    #: 8: on CPU larger batches are barely faster per image (bench/serve.py), while the peak
    #: activation memory (about 40 MB per 224 px image) and a merged request's wait grow with it.
    max_batch_size: int = int(ENV_DEFAULTS["max_batch_size"][1])
    #: How long a request may wait for others to share its model call (0: merge only what is already queued).
    max_batch_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "max_request_bytes": self.max_request_bytes >= 1024,
            "max_images": self.limits.max_images >= 1,
            "max_image_pixels": self.limits.max_image_pixels >= 1,
            "max_batch_size": self.max_batch_size >= 1,
            "max_batch_wait_ms": 0 <= self.max_batch_wait_ms <= 10_000,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid serving settings: {', '.join(bad)} out of range ({self})")
