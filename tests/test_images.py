import csv
import hashlib
import io
import struct
from itertools import zip_longest

import imagehash
import numpy as np
import pytest
from PIL import Image

from chest_ct.images import ImageInfo, InvalidImage, inspect_files, inspect_image, max_file_bytes
from tests.conftest import SHARED_DATA, synthetic_image


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("L", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG")])
def test_valid_images_are_described(tmp_path, mode, fmt):
    path = tmp_path / "img"
    path.write_bytes(synthetic_image("normal", 1, size=40, mode=mode, fmt=fmt))
    info = inspect_image(path)
    assert (info.format, info.mode, info.width, info.height) == (fmt, mode, 40, 40)
    assert 0 < info.brightness_mean < 255 and info.brightness_std > 0
    assert len(info.sha256) == 64 and len(info.phash) == 16


def test_jpeg_behind_png_name_is_read_by_content(tmp_path):
    path = tmp_path / "n7.png"
    path.write_bytes(synthetic_image("normal", 1, fmt="JPEG"))
    assert inspect_image(path).format == "JPEG"


def test_truncated_image(tmp_path):
    data = synthetic_image("normal", 1, size=64)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="cannot decode with TensorFlow") as err:
        inspect_image(path)
    assert err.value.path == str(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("radiology notes")
    with pytest.raises(InvalidImage, match="not an image"):
        inspect_image(path)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_unsupported_formats(tmp_path, fmt):
    """TensorFlow could decode GIF, BMP and WebP, but ingest accepts what the README promises: PNG and JPEG."""
    path = tmp_path / "scan.png"
    Image.new("L", (32, 32)).save(path, fmt)
    with pytest.raises(InvalidImage, match=f"unsupported image format {fmt}"):
        inspect_image(path)


def test_decompression_bomb_rejected_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path, "PNG")  # 9 Mpx of zeros: a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidImage, match="9000000 pixels is over the cap of 1000000"):
        inspect_image(path, max_pixels=1_000_000)


def cut_before_iend(data: bytes) -> bytes:
    return data[: data.rindex(b"IEND") - 4]


def corrupt_idat_checksum(data: bytes) -> bytes:
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    crc = start + 4 + length
    return data[:crc] + bytes([data[crc] ^ 0xFF]) + data[crc + 1 :]


@pytest.mark.parametrize("damage", [cut_before_iend, corrupt_idat_checksum])
def test_file_pillow_reads_but_tensorflow_refuses_is_quarantined(tmp_path, damage):
    """The old Pillow-only check let these through; training and serving then failed on them."""
    data = damage(synthetic_image("normal", 1, size=64))
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # Pillow decodes every pixel without complaint
    path = tmp_path / "scan.png"
    path.write_bytes(data)
    with pytest.raises(
        InvalidImage, match="cannot decode with TensorFlow, the decoder training and serving use: Invalid PNG data"
    ):
        inspect_image(path)


def test_truncated_jpeg(tmp_path):
    data = synthetic_image("normal", 1, size=64, fmt="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="cannot decode"):
        inspect_image(path)


def test_file_too_large_for_the_pixel_cap_is_not_read(tmp_path):
    path = tmp_path / "huge.png"
    data = synthetic_image("normal", 1, size=32)
    path.write_bytes(data + b"\0" * (max_file_bytes(100) - len(data) + 1))
    with pytest.raises(InvalidImage, match=r"more than an uncompressed image at the pixel cap"):
        inspect_image(path, max_pixels=100)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
    ],
)
def test_phash_is_imagehash_of_the_picture_the_model_sees(tmp_path, mode, fmt):
    """Hashing TensorFlow's pixels gives the same phash as imagehash on Pillow's, so groups are unchanged."""
    path = tmp_path / "img"
    img = Image.open(io.BytesIO(synthetic_image("adenocarcinoma", 3, size=64))).convert(mode)
    img.save(path, fmt)
    with Image.open(path) as pil:
        expected_phash = str(imagehash.phash(pil.convert("RGB")))
        expected_gray = np.asarray(pil.convert("L"), dtype=np.float64)
    info = inspect_image(path)
    assert info.phash == expected_phash
    tolerance = 1e-4 if fmt == "PNG" else 1.0  # JPEG: TensorFlow's IDCT differs from Pillow's by a level or so
    assert info.brightness_mean == pytest.approx(expected_gray.mean(), abs=tolerance)
    assert info.brightness_std == pytest.approx(expected_gray.std(), abs=tolerance)


def mixed_files(tmp_path) -> list:
    """Good images of every kind interleaved with every kind of bad file."""
    tmp_path.mkdir()
    good = []
    for i, (mode, fmt) in enumerate([("RGB", "PNG"), ("L", "JPEG"), ("RGBA", "PNG")] * 12):
        path = tmp_path / f"good{i}.{fmt.lower()}"
        path.write_bytes(synthetic_image("normal", i, size=48, mode=mode, fmt=fmt))
        good.append(path)
    bad = {
        "truncated.png": synthetic_image("normal", 100, size=64)[:300],
        "no-iend.png": cut_before_iend(synthetic_image("normal", 101, size=64)),
        "notes.png": b"radiology notes",
        "empty.png": b"",
        "bomb.png": None,
    }
    paths = []
    for name, data in bad.items():
        path = tmp_path / name
        if data is None:
            Image.new("L", (600, 600)).save(path, "PNG")
        else:
            path.write_bytes(data)
        paths.append(path)
    (tmp_path / "folder.png").mkdir()
    paths += [tmp_path / "folder.png", tmp_path / "missing.png"]
    return [p for pair in zip_longest(good, paths) for p in pair if p is not None]


def as_comparable(result):
    return ("ok", result) if isinstance(result, ImageInfo) else ("invalid", result.reason, result.path)


def test_parallel_validation_equals_serial_in_input_order(tmp_path):
    paths = mixed_files(tmp_path / "in")
    serial = inspect_files(paths, max_pixels=250_000, workers=0, copy_to=[tmp_path / "a" / p.name for p in paths])
    parallel = inspect_files(paths, max_pixels=250_000, workers=2, copy_to=[tmp_path / "b" / p.name for p in paths])
    assert [as_comparable(r) for r in parallel] == [as_comparable(r) for r in serial]
    for out in ("a", "b"):  # valid files are copied as validated, bad ones are not
        copied = {p.name: p.read_bytes() for p in (tmp_path / out).iterdir()}
        assert copied == {
            p.name: p.read_bytes() for p, r in zip(paths, serial, strict=True) if isinstance(r, ImageInfo)
        }
    reasons = {}
    for path, result in zip(paths, parallel, strict=True):
        if isinstance(result, ImageInfo):
            assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest(), "results stay in input order"
        else:
            assert result.path == str(path)
            reasons[path.name] = result.reason
    assert len(reasons) == 7 and len(paths) == 43
    assert reasons["truncated.png"].startswith("cannot decode with TensorFlow")
    assert reasons["no-iend.png"].startswith("cannot decode with TensorFlow")
    assert reasons["notes.png"] == reasons["empty.png"] == "not an image Pillow can identify"
    assert "360000 pixels is over the cap of 250000" in reasons["bomb.png"]
    assert reasons["folder.png"].startswith("cannot read the file: Is a directory")
    assert reasons["missing.png"].startswith("cannot read the file: No such file")


def test_copy_targets_must_match_the_paths(tmp_path):
    with pytest.raises(ValueError, match="copy_to has 1 entries for 2 paths"):
        inspect_files([tmp_path / "a.png", tmp_path / "b.png"], copy_to=[tmp_path / "x.png"])


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "manifest.csv").is_file(), reason=f"real data not found at {SHARED_DATA}")
def test_real_data_hashes_match_the_published_manifest():
    """sha256 and phash of every shared image, computed through TensorFlow's decoder on all cores, equal the
    values the data's own manifest publishes (computed independently with Pillow and imagehash)."""
    with open(SHARED_DATA / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    results = inspect_files([SHARED_DATA / r["path"] for r in rows])
    assert all(isinstance(r, ImageInfo) for r in results)
    assert [r.sha256 for r in results] == [row["sha256"] for row in rows]
    assert [r.phash for r in results] == [row["phash"] for row in rows]
    assert [(r.format, r.mode, r.width, r.height) for r in results] == [
        (row["format"], row["mode"], int(row["width"]), int(row["height"])) for row in rows
    ]
