"""Fetch a dataset from a URI (Google Drive, S3, local zip or folder) to a local folder.

:func:`fetch_dataset` also says what it refused on the way (S3 keys that would land
outside the folder), for the validation report. S3 folders download many objects at a
time through boto3's transfer manager, under the same file and byte caps as zips.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlparse

from s3transfer.subscribers import BaseSubscriber

from chest_ct.archive import LimitCounter, Limits, UnsafeArchiveError, extract_zip, unsafe_name_reason

log = logging.getLogger(__name__)

DRIVE_HOSTS = {"drive.google.com", "docs.google.com"}
DEFAULT_S3_CONCURRENCY = 16  # parallel GETs: small objects are latency-bound, not bandwidth-bound
SUPPORTED = "gdrive://FILE_ID, https://drive.google.com/..., s3://bucket/key, file://path or a local path"
#: What to pass instead when a download fails (no internet, air-gapped cluster).
OFFLINE_HINT = "pass a local folder or zip (make run DATA=../shared/data/chest-ct) or s3://<bucket>/<key> instead"


class DataSourceError(ValueError):
    """The data URI is malformed, or what it points at cannot be fetched."""


@dataclass(frozen=True)
class RefusedKey:
    """An S3 object that was not downloaded, and why (listed in the validation report)."""

    key: str
    reason: str


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_dataset` produced: the local dataset folder and what it refused on the way."""

    root: Path
    refused: tuple[RefusedKey, ...] = ()
    downloaded_files: int = 0
    downloaded_bytes: int = 0


def drive_file_id(uri: str) -> str:
    """Google Drive file id from ``gdrive://ID`` or any of Drive's share URL forms."""
    parsed = urlparse(uri)
    if parsed.scheme == "gdrive":
        file_id = (parsed.netloc + parsed.path).strip("/")
    else:
        match = re.search(r"/d/([A-Za-z0-9_-]+)", parsed.path)
        file_id = match.group(1) if match else parse_qs(parsed.query).get("id", [""])[0]
    if not re.fullmatch(r"[A-Za-z0-9_-]{10,}", file_id or ""):
        raise DataSourceError(
            f"data_uri {uri!r}: cannot find a Google Drive file id (expected gdrive://FILE_ID or a share URL)"
        )
    return file_id


def _download_drive(uri: str, workdir: Path) -> Path:
    import gdown

    file_id = drive_file_id(uri)
    target = workdir / f"gdrive-{file_id}.zip"
    try:
        result = gdown.download(id=file_id, output=str(target), quiet=True)
    except Exception as exc:  # gdown raises many types: network, quota, permission
        raise DataSourceError(
            f"data_uri {uri!r}: Google Drive download of file {file_id} failed "
            f"({' '.join(str(exc).split())}); {OFFLINE_HINT}"
        ) from exc
    if not result or not target.exists():
        raise DataSourceError(
            f"data_uri {uri!r}: Google Drive returned no file for id {file_id} (is it shared publicly?)"
        )
    return target


class _Listed(BaseSubscriber):
    """Gives the transfer manager the size and ETag from the listing: no HEAD request per object, and the
    object downloaded is the version that was listed (and counted against the caps)."""

    def __init__(self, obj: dict):
        self.size, self.etag = int(obj["Size"]), obj.get("ETag")

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.size)
        if self.etag:
            future.meta.provide_object_etag(self.etag)


def _s3_client(endpoint_url: str | None, concurrency: int):
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(max_pool_connections=max(10, concurrency)))


def _download_s3(uri: str, workdir: Path, endpoint_url: str | None, limits: Limits, concurrency: int) -> Fetched:
    """Download one object (a zip) or every object under a prefix (a folder), ``concurrency`` at a time."""
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise DataSourceError(f"data_uri {uri!r}: expected s3://bucket/key")
    s3 = _s3_client(endpoint_url, concurrency)
    try:
        if key.endswith(".zip"):
            target = workdir / Path(key).name
            s3.download_file(bucket, key, str(target))
            return Fetched(target)
        prefix = key.rstrip("/") + "/" if key else ""
        return _download_s3_folder(s3, bucket, prefix, workdir / "s3", limits, concurrency, uri)
    except (BotoCoreError, ClientError) as exc:
        raise DataSourceError(
            f"data_uri {uri!r}: S3 download failed ({' '.join(str(exc).split())}); check "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL"
        ) from exc


def _download_s3_folder(
    s3, bucket: str, prefix: str, root: Path, limits: Limits, concurrency: int, uri: str
) -> Fetched:
    """Mirror ``s3://bucket/prefix`` under ``root``; keys that would land outside it are refused, not fetched.

    Limits are checked while listing, before each object is queued, and again on the
    bytes actually written; the transfer manager's bounded queue keeps memory flat.
    """
    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from botocore.exceptions import BotoCoreError, ClientError

    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    counter = LimitCounter(f"s3://{bucket}/{prefix}", root, limits)
    refused: list[RefusedKey] = []
    files: set[str] = set()
    folders: set[str] = set()
    queued: deque[tuple[Any, str, Path]] = deque()  # s3transfer futures (untyped)
    written = 0

    def settle(keep: int) -> None:
        nonlocal written
        while len(queued) > keep:
            future, obj_key, dest = queued.popleft()
            try:
                future.result()
            except (BotoCoreError, ClientError) as exc:
                raise DataSourceError(
                    f"data_uri {uri!r}: S3 download of s3://{bucket}/{obj_key} failed: {exc}"
                ) from exc
            written += dest.stat().st_size
            if written > counter.bytes:  # the server sent more than it listed
                raise UnsafeArchiveError(
                    f"s3://{bucket}/{obj_key}: more bytes arrived than the listing declared "
                    f"({written} > {counter.bytes} in total)"
                )

    config = TransferConfig(max_concurrency=concurrency, use_threads=concurrency > 1)
    with create_transfer_manager(s3, config) as manager:  # on an error, its exit cancels what is queued
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # the prefix itself, or a folder marker
                reason = unsafe_name_reason(rel) or _clash(rel, files, folders)
                if reason:
                    refused.append(RefusedKey(obj["Key"], reason))
                    log.warning("refused s3://%s/%s: %s", bucket, obj["Key"], reason)
                    continue
                counter.add_file(obj["Key"])
                counter.add_bytes(obj["Key"], int(obj["Size"]))
                dest = root.joinpath(*_parts(rel))
                dest.parent.mkdir(parents=True, exist_ok=True)
                future = manager.download(bucket, obj["Key"], str(dest), subscribers=[_Listed(obj)])
                queued.append((future, obj["Key"], dest))
                settle(keep=4 * concurrency)
        settle(keep=0)
    if counter.files == 0:
        raise DataSourceError(
            f"data_uri {uri!r}: no objects under s3://{bucket}/{prefix}"
            + (f" ({len(refused)} refused: {refused[0].key!r} {refused[0].reason}, ...)" if refused else "")
        )
    log.info(
        "downloaded %d objects (%d bytes) from s3://%s/%s; refused %d",
        counter.files,
        written,
        bucket,
        prefix,
        len(refused),
    )
    return Fetched(root, tuple(refused), counter.files, written)


def _parts(rel: str) -> tuple[str, ...]:
    return PurePosixPath(rel.replace("\\", "/")).parts


def _clash(rel: str, files: set[str], folders: set[str]) -> str | None:
    """A key that needs a folder where another key is a file, or the reverse (``a`` and ``a/b``)."""
    parts = _parts(rel)
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    path = "/".join(parts)
    if path in folders or path in files or any(p in files for p in parents):
        return "clashes with another key (a file and a folder of the same name, or the same path twice)"
    files.add(path)
    folders.update(parents)
    return None


def fetch_dataset(
    uri: str,
    workdir: Path,
    *,
    s3_endpoint_url: str | None = None,
    max_files: int | None = None,
    max_bytes: int | None = None,
    s3_concurrency: int = DEFAULT_S3_CONCURRENCY,
) -> Fetched:
    """Fetch the dataset that ``uri`` names; return its local folder and what was refused on the way.

    Local folders are used in place (read only); everything else is downloaded
    into ``workdir`` and zips are unpacked there with :func:`extract_zip`. Wrapper
    folders inside (``Data/``) are left for :func:`chest_ct.ingest.discover`. The file
    and byte caps apply to zips and S3 folders alike.
    """
    if not uri or not uri.strip():
        raise DataSourceError(f"data_uri is empty; expected {SUPPORTED}")
    uri = uri.strip()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    limits = Limits(**{k: v for k, v in {"max_files": max_files, "max_bytes": max_bytes}.items() if v})
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    fetched = None
    if scheme == "gdrive" or (scheme in {"http", "https"} and parsed.netloc in DRIVE_HOSTS):
        local = _download_drive(uri, workdir)
    elif scheme == "s3":
        fetched = _download_s3(uri, workdir, s3_endpoint_url, limits, max(1, s3_concurrency))
        local = fetched.root
    elif scheme == "file":
        local = Path(parsed.path)
    elif scheme == "" or (len(scheme) == 1 and uri[1:3] in {":\\", ":/"}):
        local = Path(uri).expanduser()
    else:
        raise DataSourceError(f"data_uri {uri!r}: unsupported scheme {scheme!r}; expected {SUPPORTED}")

    if not local.exists():
        raise DataSourceError(f"data_uri {uri!r}: {local} does not exist")
    if local.is_dir():
        return fetched or Fetched(local)
    if zipfile.is_zipfile(local):
        return Fetched(
            extract_zip(local, workdir / "extracted", max_files=limits.max_files, max_bytes=limits.max_bytes)
        )
    raise DataSourceError(f"data_uri {uri!r}: {local} is neither a folder nor a zip archive")


def fetch(uri: str, workdir: Path, **kwargs) -> Path:
    """The local dataset folder for ``uri`` (see :func:`fetch_dataset`, which also returns the refused S3 keys)."""
    return fetch_dataset(uri, workdir, **kwargs).root
