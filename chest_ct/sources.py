"""Fetch a dataset from a URI (Google Drive, S3, local zip or folder) to a local folder."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from chest_ct.archive import extract_zip

DRIVE_HOSTS = {"drive.google.com", "docs.google.com"}
SUPPORTED = "gdrive://FILE_ID, https://drive.google.com/..., s3://bucket/key, file://path or a local path"
#: What to pass instead when a download fails (no internet, air-gapped cluster).
OFFLINE_HINT = "pass a local folder or zip (make run DATA=../shared/data/chest-ct) or s3://<bucket>/<key> instead"


class DataSourceError(ValueError):
    """The data URI is malformed, or what it points at cannot be fetched."""


def drive_file_id(uri: str) -> str:
    """Google Drive file id from ``gdrive://ID`` or any of Drive's share URL forms."""
    parsed = urlparse(uri)
    if parsed.scheme == "gdrive":
        file_id = (parsed.netloc + parsed.path).strip("/")
    else:
        match = re.search(r"/d/([A-Za-z0-9_-]+)", parsed.path)
        file_id = match.group(1) if match else parse_qs(parsed.query).get("id", [""])[0]
    if not re.fullmatch(r"[A-Za-z0-9_-]{10,}", file_id or ""):
        raise DataSourceError(f"data_uri {uri!r}: cannot find a Google Drive file id (expected gdrive://FILE_ID or a share URL)")
    return file_id


def _download_drive(uri: str, workdir: Path) -> Path:
    import gdown

    file_id = drive_file_id(uri)
    target = workdir / f"gdrive-{file_id}.zip"
    try:
        result = gdown.download(id=file_id, output=str(target), quiet=True)
    except Exception as exc:  # gdown raises many types: network, quota, permission
        raise DataSourceError(f"data_uri {uri!r}: Google Drive download of file {file_id} failed "
                              f"({' '.join(str(exc).split())}); {OFFLINE_HINT}") from exc
    if not result or not target.exists():
        raise DataSourceError(f"data_uri {uri!r}: Google Drive returned no file for id {file_id} (is it shared publicly?)")
    return target


def _download_s3(uri: str, workdir: Path, endpoint_url: str | None) -> Path:
    """Download one object (a zip) or every object under a prefix (a folder)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise DataSourceError(f"data_uri {uri!r}: expected s3://bucket/key")
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    try:
        if key.endswith(".zip"):
            target = workdir / Path(key).name
            s3.download_file(bucket, key, str(target))
            return target
        prefix = key.rstrip("/") + "/" if key else ""
        root = workdir / "s3"
        count = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/") or ".." in Path(rel).parts:
                    continue
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(dest))
                count += 1
        if count == 0:
            raise DataSourceError(f"data_uri {uri!r}: no objects under s3://{bucket}/{prefix}")
        return root
    except (BotoCoreError, ClientError) as exc:
        raise DataSourceError(f"data_uri {uri!r}: S3 download failed ({' '.join(str(exc).split())}); check "
                              "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL") from exc


def fetch(uri: str, workdir: Path, *, s3_endpoint_url: str | None = None, max_files: int | None = None,
          max_bytes: int | None = None) -> Path:
    """Return a local folder holding the dataset that ``uri`` names.

    Local folders are used in place (read only); everything else is downloaded
    into ``workdir`` and zips are unpacked there with :func:`extract_zip`. Wrapper
    folders inside (``Data/``) are left for :func:`chest_ct.ingest.discover`.
    """
    if not uri or not uri.strip():
        raise DataSourceError(f"data_uri is empty; expected {SUPPORTED}")
    uri = uri.strip()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "gdrive" or (scheme in {"http", "https"} and parsed.netloc in DRIVE_HOSTS):
        local = _download_drive(uri, workdir)
    elif scheme == "s3":
        local = _download_s3(uri, workdir, s3_endpoint_url)
    elif scheme == "file":
        local = Path(parsed.path)
    elif scheme == "" or (len(scheme) == 1 and uri[1:3] in {":\\", ":/"}):
        local = Path(uri).expanduser()
    else:
        raise DataSourceError(f"data_uri {uri!r}: unsupported scheme {scheme!r}; expected {SUPPORTED}")

    if not local.exists():
        raise DataSourceError(f"data_uri {uri!r}: {local} does not exist")
    if local.is_dir():
        return local
    if zipfile.is_zipfile(local):
        limits = {k: v for k, v in {"max_files": max_files, "max_bytes": max_bytes}.items() if v}
        return extract_zip(local, workdir / "extracted", **limits)
    raise DataSourceError(f"data_uri {uri!r}: {local} is neither a folder nor a zip archive")
