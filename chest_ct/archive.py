"""Safe unpacking of datasets from places we do not control: zip archives and S3 folders.

Both go through the same rules: member names may not escape their folder, and the
number of files and bytes is capped (and checked against the free disk space) as they
arrive, not after the disk is full.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Sized for hospital archives (a million CT slices); the disk-space check is the tighter
# guard on most machines.
DEFAULT_MAX_FILES = 2_000_000
DEFAULT_MAX_BYTES = 1024**4  # 1 TiB unpacked
NAME_MAX = 255  # bytes per path component on Linux filesystems


class UnsafeArchiveError(ValueError):
    """The archive or folder tries to write outside its folder, or is too large to unpack."""


@dataclass(frozen=True)
class Limits:
    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` (a zip member or an S3 key below its prefix) may not be written under a folder, or None.

    Backslashes count as separators, as Windows tools write them.
    """
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if "\0" in name:
        return "contains a NUL byte"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "escapes its folder ('..')"
    if any(len(part.encode()) > NAME_MAX for part in parts):
        return f"has a path component longer than {NAME_MAX} bytes"
    return None


class LimitCounter:
    """Counts files and bytes as they arrive; raises :class:`UnsafeArchiveError` past a cap or the free disk space."""

    def __init__(self, source: str, dest: Path, limits: Limits = Limits()):
        self.source, self.limits = source, limits
        self.free = shutil.disk_usage(dest).free
        self.files = self.bytes = 0

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UnsafeArchiveError(
                f"{self.source}: more than the cap of {self.limits.max_files} files (reached at {name!r})"
            )

    def add_bytes(self, name: str, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            raise UnsafeArchiveError(
                f"{self.source}: {name!r} brings the total to {self.bytes} bytes, "
                f"more than the cap of {self.limits.max_bytes}"
            )
        if self.bytes > self.free:
            raise UnsafeArchiveError(
                f"{self.source}: {name!r} brings the total to {self.bytes} bytes, "
                f"more than the {self.free} bytes free on disk"
            )


def _member_target(dest: Path, info: zipfile.ZipInfo, archive: Path) -> Path | None:
    reason = unsafe_name_reason(info.filename)
    if reason:
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} {reason}")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
    if info.is_dir():
        return None
    target = (dest / Path(*PurePosixPath(info.filename.replace("\\", "/")).parts)).resolve()
    if not target.is_relative_to(dest):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} resolves outside {dest}")
    return target


def extract_zip(
    archive: Path,
    dest: Path,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every member.

    Sizes are checked twice: against the headers before anything is written (cheap
    rejection of zip bombs), and while streaming, because headers can lie.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"{archive}: not a valid zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        targets = [(info, _member_target(dest, info, archive)) for info in infos]
        files = [(info, target) for info, target in targets if target is not None]
        if len(files) > max_files:
            raise UnsafeArchiveError(f"{archive}: {len(files)} files, more than the cap of {max_files}")
        declared = sum(info.file_size for info, _ in files)
        if declared > max_bytes:
            raise UnsafeArchiveError(f"{archive}: {declared} bytes uncompressed, more than the cap of {max_bytes}")
        free = shutil.disk_usage(dest).free
        if declared > free:
            raise UnsafeArchiveError(
                f"{archive}: {declared} bytes uncompressed, more than the {free} bytes free on disk"
            )
        written = 0
        for info, target in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise UnsafeArchiveError(
                                f"{archive}: member {info.filename!r} inflates past the cap of {max_bytes} bytes"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:  # corrupt data, bad CRC, lying sizes
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is corrupt: {exc}") from exc
    return dest
