"""Copy a trained SavedModel to the S3 prefix KServe serves it from.

Credentials come from the usual boto3 sources (``AWS_ACCESS_KEY_ID``...,
``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO); ``endpoint_url``
overrides the endpoint for one call.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_SAVED_MODEL_FILE = "saved_model.pb"
_S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(.+)")


def parse_s3_uri(uri: str, *, field: str = "s3_uri") -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix (no trailing slash).

    A model always lives under a prefix: uploading to a bucket's root would mix
    its files with everything else in the bucket.
    """
    match = _S3_URI.fullmatch(uri or "")
    prefix = match.group(2).strip("/") if match else ""
    if not match or not prefix:
        raise ValueError(f"{field}: expected s3://<bucket>/<prefix>, got {uri!r}")
    return match.group(1), prefix


def model_uri(model_store_uri: str, version: str) -> str:
    """Where model ``version`` (e.g. its MLflow run id) lives: one fresh prefix per model."""
    bucket, prefix = parse_s3_uri(model_store_uri, field="model_store_uri")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", version or ""):
        raise ValueError(f"version: expected letters, digits, '.', '_' or '-', got {version!r}")
    return f"s3://{bucket}/{prefix}/{version}"


def upload_model_dir(model_dir: Path, s3_uri: str, endpoint_url: str | None = None, *, s3_client: Any = None) -> str:
    """Copy a SavedModel folder to ``s3_uri`` and return the URI to serve from.

    KServe's storage initializer downloads whatever is under the prefix, so
    files left there by another model would be served alongside this one: that
    is refused. Uploading the same folder again (a retried pipeline step) is not.
    """
    model_dir = Path(model_dir)
    if not (model_dir / _SAVED_MODEL_FILE).is_file():
        raise ValueError(
            f"model_dir: expected a TensorFlow SavedModel folder containing {_SAVED_MODEL_FILE}, got {model_dir}"
        )
    bucket, prefix = parse_s3_uri(s3_uri)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    keys = {f"{prefix}/{p.relative_to(model_dir).as_posix()}": p for p in files}

    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3", endpoint_url=endpoint_url or None)
    foreign = sorted(set(_list_keys(s3_client, bucket, prefix + "/")) - set(keys))
    if foreign:
        raise ValueError(
            f"s3_uri: s3://{bucket}/{prefix} already holds files that are not in {model_dir} "
            f"(e.g. {foreign[0]!r}); upload each model version to its own prefix"
        )
    # saved_model.pb last: anything that polls for it sees a complete model.
    for key, path in sorted(keys.items(), key=lambda item: item[1].name == _SAVED_MODEL_FILE):
        s3_client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{prefix}"


def _list_keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    paginator = s3_client.get_paginator("list_objects_v2")
    return [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])]
