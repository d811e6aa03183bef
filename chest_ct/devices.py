"""Fail early and clearly when a GPU was asked for but TensorFlow cannot use it.

A training pod that requested ``nvidia.com/gpu`` but whose TensorFlow sees no
GPU trains on CPU, 20x slower, and the run still goes green. The usual causes
on a cluster: the driver libraries are not on the library path (GKE mounts
them under /usr/local/nvidia, which Dockerfile.train adds to
LD_LIBRARY_PATH), the pod landed on a node without the device plugin, or the
image has a CPU build of TensorFlow.

The compiled pipeline tells the train step how many GPUs it requested in
``CHEST_CT_EXPECTED_GPUS`` (pipelines/cluster.py); ``python -m chest_ct.devices``
is the same check for a smoke-test Job.

With two or more GPUs, :func:`training_strategy` mirrors the model on each of them
(``tf.distribute.MirroredStrategy``): the feature pass, the head and fine-tuning split
every batch across the replicas and average their gradients. Training across nodes is
the next step (docs/cluster.md, "Several nodes").
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Mapping, Sequence

EXPECTED_GPUS_ENV = "CHEST_CT_EXPECTED_GPUS"
#: Where GKE's NVIDIA driver installer mounts the driver libraries in GPU containers.
GKE_DRIVER_LIBS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib")


class GpuUnavailableError(RuntimeError):
    """GPUs were requested for this step, TensorFlow sees fewer."""


def expected_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """How many GPUs this step was given (0 when the variable is unset: CPU runs, ``make run``)."""
    raw = environ.get(EXPECTED_GPUS_ENV, "").strip() or "0"
    if not raw.isdigit():
        raise ValueError(f"{EXPECTED_GPUS_ENV}={raw!r}: expected a whole number of GPUs")
    return int(raw)


def visible_gpus() -> list[str]:
    import tensorflow as tf

    return [device.name for device in tf.config.list_physical_devices("GPU")]


def training_strategy(devices: Sequence[str] | None = None):
    """``MirroredStrategy`` over ``devices`` (default: every visible GPU) when there are two or more, else
    TensorFlow's default strategy (one device, its scope changes nothing).

    The model must be built or loaded inside ``strategy.scope()``; ``batch_size`` stays the global batch,
    split across the replicas.
    """
    import tensorflow as tf

    names = [d.name for d in tf.config.list_logical_devices("GPU")] if devices is None else list(devices)
    if len(names) < 2:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(names)


def check_gpus(expected: int, visible: Sequence[str] | None = None) -> list[str]:
    """The visible GPU names; raises GpuUnavailableError when fewer than ``expected``."""
    found = list(visible_gpus() if visible is None else visible)
    if len(found) < expected:
        raise GpuUnavailableError(
            f"this step was given {expected} GPU(s) ({EXPECTED_GPUS_ENV}={expected}) but TensorFlow sees "
            f"{len(found)}; {diagnosis()}. Training on CPU would be many times slower, so the step stops here. "
            "Compile with CHEST_CT_GPU_COUNT=0 to train on CPU on purpose."
        )
    return found


def diagnosis() -> str:
    """What is missing, as far as can be told from inside the container."""
    import tensorflow as tf

    if not tf.test.is_built_with_cuda():
        return "this TensorFlow is a CPU build (tensorflow-cpu); the training image must install tensorflow[and-cuda]"
    if not os.environ.get("NVIDIA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
        return (
            "no NVIDIA device is mounted in this container (no /dev/nvidia0, NVIDIA_VISIBLE_DEVICES unset): "
            "check the GPU request, the node selector and that the node runs the NVIDIA device plugin"
        )
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        path = os.environ.get("LD_LIBRARY_PATH", "")
        return (
            f"the NVIDIA driver library libcuda.so.1 cannot be loaded (LD_LIBRARY_PATH={path!r}); "
            f"GKE mounts it under {GKE_DRIVER_LIBS[0]}"
        )
    return "the driver loads but TensorFlow found no usable GPU (CUDA/driver version mismatch? see the log above)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chest_ct.devices", description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--expect", type=int, default=None, help=f"GPUs that must be visible (default: ${EXPECTED_GPUS_ENV}, else 0)"
    )
    parser.add_argument("--matmul", action="store_true", help="also run a 1024x1024 matmul and print its device")
    args = parser.parse_args(argv)
    try:
        found = check_gpus(expected_gpus() if args.expect is None else args.expect)
    except (GpuUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"GPUs visible to TensorFlow: {found or 'none'}")
    if args.matmul:
        import tensorflow as tf

        product = tf.random.normal((1024, 1024)) @ tf.random.normal((1024, 1024))
        print(f"matmul ran on {product.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
