import io

import pytest
from PIL import Image

from chest_ct.duplicates import group_duplicates
from chest_ct.images import InvalidImage, inspect_image
from tests.conftest import synthetic_image


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
    with pytest.raises(InvalidImage, match="cannot decode"):
        inspect_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("radiology notes")
    with pytest.raises(InvalidImage, match="not an image"):
        inspect_image(path)


def test_unsupported_format(tmp_path):
    path = tmp_path / "scan.gif"
    Image.new("L", (32, 32)).save(path, "GIF")
    with pytest.raises(InvalidImage, match="unsupported image format GIF"):
        inspect_image(path)


def test_decompression_bomb_rejected_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path, "PNG")  # 9 Mpx of zeros: a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidImage, match="9000000 pixels is over the cap of 1000000"):
        inspect_image(path, max_pixels=1_000_000)


def test_duplicate_groups_exact_near_and_transitive():
    base = "ffffffff00000000"
    near = "fffffff700000000"    # 1 bit from base
    nearer = "fffffff700000003"  # 2 bits from near, 3 from base
    far = "00000000ffffffff"
    groups = group_duplicates(["a", "b", "a", "c", "d"], [base, far, "aaaaaaaaaaaaaaaa", near, nearer], max_distance=2)
    assert groups[0] == groups[2], "same sha256 joins regardless of phash"
    assert groups[0] == groups[3] == groups[4], "near duplicates chain"
    assert groups[1] != groups[0]
    exact_only = group_duplicates(["a", "b", "a", "c", "d"], [base, far, "aaaaaaaaaaaaaaaa", near, nearer], max_distance=-1)
    assert len(set(exact_only)) == 4
