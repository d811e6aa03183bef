"""The classifier: a frozen VGG16 convolutional base and a small trainable head."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import keras

BASE_LAYER = "vgg16"
HEAD_LAYER = "head"
BASE_WEIGHT_CHOICES = (
    "'imagenet' (Keras download), 'none' (random init), a local .h5 file or s3://bucket/key.h5 (air-gapped clusters)"
)
#: What to pass instead when a download fails (no internet on the cluster or laptop).
_OFFLINE_HINT = (
    "without internet pass base_weights=s3://<bucket>/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 "
    "(a copy of Keras' file in your object store), a local .h5 path, or none (random init)"
)


class WeightsDownloadError(ValueError):
    """The base weights could not be downloaded; the message is one line naming the URL and the alternatives."""


def resolve_base_weights(base_weights: str) -> str | None:
    """Map the pipeline parameter to what ``keras.applications.VGG16(weights=...)`` takes.

    ``s3://`` weights are downloaded with boto3, credentials and endpoint from
    the usual AWS_* variables (the same Secret the pipeline uses for data).
    """
    value = (base_weights or "").strip()
    if value.lower() == "imagenet":
        return "imagenet"
    if value.lower() in {"none", "random", ""}:
        return None
    if value.startswith("s3://"):
        return str(_download_s3_weights(value))
    path = Path(value).expanduser()
    if path.suffix != ".h5":
        raise ValueError(f"base_weights={base_weights!r}: expected {BASE_WEIGHT_CHOICES}")
    if not path.is_file():
        raise ValueError(f"base_weights={base_weights!r}: file {path} does not exist")
    return str(path)


def _download_s3_weights(uri: str) -> Path:
    match = re.fullmatch(r"s3://([^/]+)/(.+\.h5)", uri)
    if not match:
        raise ValueError(f"base_weights={uri!r}: expected s3://<bucket>/<key>.h5")
    bucket, key = match.groups()
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    target = Path(tempfile.mkdtemp(prefix="chest-ct-weights-")) / Path(key).name
    try:
        boto3.client("s3").download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as exc:
        reason = " ".join(str(exc).split())
        raise WeightsDownloadError(
            f"base_weights={uri!r}: cannot download it from S3 ({reason}); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL, or pass a local .h5 path or none"
        ) from None
    return target


def build_model(image_size: int = 224, base_weights: str = "imagenet", dropout: float = 0.3) -> keras.Model:
    """VGG16 (``include_top=False``, frozen, average-pooled) followed by a new head.

    The head is a single sigmoid unit: the probability of the positive class
    (adenocarcinoma); the two classes are told apart by a threshold chosen at
    evaluation time. The head is a named sub-model so training can fit it alone
    on cached base features.
    """
    if not 32 <= int(image_size) <= 1024:
        raise ValueError(f"image_size={image_size}: expected an integer between 32 and 1024 (VGG16 needs >= 32)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: expected 0 <= dropout < 1")
    weights = resolve_base_weights(base_weights)
    try:
        base = keras.applications.VGG16(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg"
        )
    except ValueError as exc:  # wrong .h5 file (e.g. with top layers) or shape mismatch
        raise ValueError(f"base_weights={base_weights!r}: cannot load into VGG16 without top: {exc}") from exc
    except Exception as exc:  # Keras raises a bare Exception("URL fetch failure on <url>: ...") offline
        fetch = re.match(r"URL fetch failure on (\S+?):? (.*)", " ".join(str(exc).split()))
        if weights != "imagenet" or not fetch:
            raise
        raise WeightsDownloadError(
            f"base_weights='imagenet': cannot download {fetch.group(1)} ({fetch.group(2)}); {_OFFLINE_HINT}"
        ) from None
    base.trainable = False
    head = keras.Sequential(
        [
            keras.Input(shape=base.output_shape[1:]),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(1, activation="sigmoid", name="probability"),
        ],
        name=HEAD_LAYER,
    )
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    return keras.Model(inputs, head(base(inputs, training=False)), name="chest_ct")


def split_model(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Return ``(base, head)`` of a model made by :func:`build_model`."""
    try:
        return model.get_layer(BASE_LAYER), model.get_layer(HEAD_LAYER)
    except ValueError as exc:
        raise ValueError(
            f"model {model.name!r} lacks a '{BASE_LAYER}' base and a '{HEAD_LAYER}' head; "
            "expected the output of the base model step"
        ) from exc


def image_size_of(model: keras.Model) -> int:
    return int(model.input_shape[1])
