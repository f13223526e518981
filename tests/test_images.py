"""Tests for opensam.images: robust photo loading, label PNGs and the two resizes."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensam.errors import InputError
from opensam.images import (
    FileRef,
    is_image_name,
    load_label_codes,
    load_label_index,
    load_label_rgb,
    load_rgb,
    load_rgb_and_size,
    read_image_size,
    resize_image,
    resize_label,
    rgb_code,
)

ORIENTATION = 0x0112


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    """(h, w, 3) uint8 with four flat coloured quadrants (robust to JPEG)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def _save_with_orientation(path: Path, rgb: np.ndarray, orientation: int) -> None:
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[ORIENTATION] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), from (H, W, 3) uint16."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + (chunk(b"IEND", b""))
    )


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, lambda a: a),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, expected, ext: str) -> None:
    rgb = _quadrants()
    path = tmp_path / f"photo{ext}"
    _save_with_orientation(path, rgb, orientation)
    out, size = load_rgb_and_size(path)
    want = expected(rgb)
    assert out.shape == want.shape and out.dtype == np.uint8
    assert size == want.shape[:2] == read_image_size(path)
    assert np.abs(out.astype(int) - want).mean() < 10  # JPEG noise only, not a wrong rotation


def test_grayscale_palette_and_bilevel_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 1], gray)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png")[0, 1].tolist() == [200, 100, 50]
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert load_rgb(tmp_path / "b.png")[0].tolist() == [[255] * 3, [0] * 3]


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half: mid grey
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    pal.putpalette([1, 2, 3, 9, 9, 9] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pt.png", transparency=1)
    assert load_rgb(tmp_path / "pt.png")[0].tolist() == [[1, 2, 3], [255, 255, 255]]


def test_16bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_16bit_rgb_png(tmp_path: Path) -> None:
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0, 0] = (65535, 32896, 257)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(arr))
    out = load_rgb(tmp_path / "rgb16.png")
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 128, 1]


def test_cmyk_jpeg_and_tiff(tmp_path: Path) -> None:
    rgb = _quadrants(16, 16)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        out = load_rgb(tmp_path / name)
        assert out.shape == (16, 16, 3)
        assert np.abs(out.astype(int) - rgb).max() < 40


def test_int32_and_float_modes(tmp_path: Path) -> None:
    as_int = Image.fromarray(np.array([[0, 100, 200]], np.int32), mode="I")
    as_int.save(tmp_path / "i.tif")
    assert load_rgb(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 100, 200]  # 8-bit range kept
    wide = Image.fromarray(np.array([[0, 65535]], np.int32), mode="I")
    wide.save(tmp_path / "w.tif")
    assert load_rgb(tmp_path / "w.tif")[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(tmp_path / "f.tif")
    assert load_rgb(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_images_raise_one_line_input_error(tmp_path: Path, damage: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    data = {"garbage": b"not an image at all", "truncated": buf.getvalue()[:600], "empty": b""}
    path = tmp_path / "bad.jpg"
    path.write_bytes(data[damage])
    with pytest.raises(InputError) as err:
        load_rgb(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot read image (") and "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.jpg: file not found"):
        load_rgb(tmp_path / "nope.jpg")


def test_draft_decodes_jpeg_at_reduced_size_but_not_below(tmp_path: Path) -> None:
    rgb = np.kron(_quadrants(8, 8), np.ones((86, 128, 1), np.uint8))  # 688 x 1024
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    full, size = load_rgb_and_size(tmp_path / "big.jpg")
    small, size2 = load_rgb_and_size(tmp_path / "big.jpg", min_size=256)
    assert full.shape == (688, 1024, 3) and size == size2 == (688, 1024)
    assert small.shape == (344, 512, 3)  # 1/2 scale: 1/4 would make the height < 256
    Image.fromarray(rgb).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", min_size=256).shape == (688, 1024, 3)  # PNG: no draft


def test_draft_swaps_size_for_rotated_photos(tmp_path: Path) -> None:
    rgb = np.zeros((400, 2000, 3), np.uint8)  # stored 2000 wide; oriented 400 wide, 2000 high
    _save_with_orientation(tmp_path / "r.jpg", rgb, 6)
    small, size = load_rgb_and_size(tmp_path / "r.jpg", min_size=(1000, 100))  # (h, w)
    assert size == (2000, 400)
    assert small.shape[0] >= 1000 and small.shape[1] >= 100
    assert small.shape[:2] == (1000, 200)


def test_resize_image_is_antialiased_and_squashes() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    rgb = np.repeat(checker[:, :, None], 3, axis=2)
    out = resize_image(rgb, (16, 32))
    assert out.shape == (16, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 128).max() <= 8  # nearest would give 0 or 255
    assert resize_image(rgb, 64) is rgb


def test_resize_label_is_nearest() -> None:
    label = np.random.default_rng(1).choice(np.array([0, 3, 255], np.uint8), size=(30, 50))
    out = resize_label(label, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 3, 255}
    big = resize_label(np.array([[1, 2], [3, 4]], np.uint8), (4, 4))
    assert big.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_label_loaders(tmp_path: Path) -> None:
    pal = Image.fromarray(np.array([[0, 1, 255]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 759 + [224, 224, 192])
    pal.save(tmp_path / "voc.png")
    assert load_label_index(tmp_path / "voc.png").tolist() == [[0, 1, 255]]
    assert load_label_rgb(tmp_path / "voc.png").tolist() == [
        [[0, 0, 0], [128, 0, 0], [224] * 2 + [192]]
    ]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (5, 6, 7, 0)  # alpha is dropped for labels, not composited
    Image.fromarray(rgba).save(tmp_path / "c.png")
    assert load_label_index(tmp_path / "c.png") is None
    assert load_label_rgb(tmp_path / "c.png")[0, 1].tolist() == [5, 6, 7]
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(tmp_path / "i16.png")
    with pytest.raises(InputError, match="i16.png: label PNG has mode"):
        load_label_rgb(tmp_path / "i16.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_label_codes_match_rgb_code(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        img.putalpha(7)
    elif mode == "P":
        img = img.quantize(16)
        rgb = np.asarray(img.convert("RGB"))
    img.save(tmp_path / "l.png")
    codes = load_label_codes(tmp_path / "l.png")
    assert codes.shape == (5, 7) and codes.dtype == np.uint32
    want = [[rgb_code(*map(int, px)) for px in row] for row in rgb]
    assert codes.tolist() == want
    assert rgb_code(1, 2, 3) != rgb_code(3, 2, 1)


def test_file_ref_reads_zip_members(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_quadrants(4, 6)).save(buf, "PNG")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("x/img.png", buf.getvalue())
    ref = FileRef(tmp_path / "a.zip", "x/img.png")
    assert str(ref) == f"zip:{tmp_path / 'a.zip'}!x/img.png"
    assert np.array_equal(load_rgb(ref.source(), str(ref)), _quadrants(4, 6))
    assert FileRef(tmp_path / "a.zip").source() == tmp_path / "a.zip"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a.JPG", True),
        ("b.jpeg", True),
        ("c.Tif", True),
        ("d.bmp", True),
        ("e.txt", False),
        ("png", False),
    ],
)
def test_is_image_name(name: str, ok: bool) -> None:
    assert is_image_name(name) is ok
