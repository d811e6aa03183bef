import stat
import zipfile
from pathlib import Path

import pytest

from chest_ct.archive import UnsafeArchiveError, extract_zip


def make_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_extracts_nested_members(tmp_path):
    archive = make_zip(tmp_path / "ok.zip", {"Data/train/normal/a.png": b"x", "Data/train/adenocarcinoma/b.png": b"yy"})
    out = extract_zip(archive, tmp_path / "out")
    assert (out / "Data/train/normal/a.png").read_bytes() == b"x"
    assert (out / "Data/train/adenocarcinoma/b.png").read_bytes() == b"yy"


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../evil.png", "escapes"),
        ("Data/../../evil.png", "escapes"),
        ("/etc/evil.png", "absolute"),
        ("C:/evil.png", "absolute"),
    ],
)
def test_rejects_path_traversal(tmp_path, name, problem):
    archive = make_zip(tmp_path / "bad.zip", {"ok.png": b"x", name: b"evil"})
    with pytest.raises(UnsafeArchiveError, match=problem) as err:
        extract_zip(archive, tmp_path / "out")
    assert name in str(err.value)
    assert not (tmp_path / "evil.png").exists()
    assert not list((tmp_path / "out").rglob("*.png")), "nothing is written before every member is checked"


def test_rejects_symlink_member(tmp_path):
    archive = make_zip(tmp_path / "link.zip", {"ok.png": b"x"}, symlink="train/normal/link.png")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(archive, tmp_path / "out")


def test_caps_file_count(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.png": b"x" for i in range(11)})
    with pytest.raises(UnsafeArchiveError, match="11 files, more than the cap of 10"):
        extract_zip(archive, tmp_path / "out", max_files=10)


def test_caps_uncompressed_size_zip_bomb(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"bomb.png": b"\0" * 5_000_000})
    assert archive.stat().st_size < 50_000  # compresses ~1000:1
    with pytest.raises(UnsafeArchiveError, match="more than the cap of 1000000"):
        extract_zip(archive, tmp_path / "out", max_bytes=1_000_000)


def test_header_that_lies_about_size_is_caught(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", {"a.png": b"A" * 100_000})
    raw = bytearray(archive.read_bytes())
    # Rewrite the declared uncompressed size (local header and central directory) to 10 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = raw.find(sig)
        raw[pos + offset : pos + offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchiveError, match="corrupt"):
        extract_zip(archive, tmp_path / "out", max_bytes=1000)


def test_not_a_zip(tmp_path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"this is not a zip")
    with pytest.raises(UnsafeArchiveError, match="not a valid zip"):
        extract_zip(bogus, tmp_path / "out")
