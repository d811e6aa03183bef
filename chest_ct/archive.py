"""Safe extraction of dataset archives downloaded from places we do not control."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

DEFAULT_MAX_FILES = 100_000
DEFAULT_MAX_BYTES = 20 * 1024**3  # 20 GiB uncompressed


class UnsafeArchiveError(ValueError):
    """The archive tries to write outside its folder, or is too large to unpack."""


def _member_target(dest: Path, info: zipfile.ZipInfo, archive: Path) -> Path | None:
    name = info.filename.replace("\\", "/")
    posix = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} has an absolute path")
    if ".." in posix.parts:
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} escapes the archive folder ('..')")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
    if info.is_dir():
        return None
    target = (dest / Path(*posix.parts)).resolve()
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
        files = [(info, _member_target(dest, info, archive)) for info in infos]
        files = [(info, target) for info, target in files if target is not None]
        if len(files) > max_files:
            raise UnsafeArchiveError(f"{archive}: {len(files)} files, more than the cap of {max_files}")
        declared = sum(info.file_size for info, _ in files)
        if declared > max_bytes:
            raise UnsafeArchiveError(
                f"{archive}: {declared} bytes uncompressed, more than the cap of {max_bytes}"
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
