"""Tests for opensam.data.importers (CVAT / VOC import, dir or zip) and opensam.data.cvat."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensam.config import ClassSpec
from opensam.data.cvat import parse_labelmap, write_cvat_export
from opensam.data.importers import VOC_CLASSES, list_unlabelled, open_export, voc_colormap
from opensam.errors import InputError

LABELMAP = {
    "background": (0, 0, 0),
    "lizard": (250, 220, 40),
    "hand": (40, 200, 60),
    "color board": (40, 90, 230),
    "scrap": (255, 255, 255),
}
# params order differs from the labelmap; names differ in case and whitespace
CLASSES = (
    ClassSpec("lizard", "a lizard"),
    ClassSpec("Hand", "a human hand"),
    ClassSpec(" color board ", "a color board"),
    ClassSpec("background", "a background"),
)
TO_ID = {"lizard": 0, "hand": 1, "color board": 2, "background": 3, "scrap": 255}
H, W = 12, 16


def _entries(seed: int) -> np.ndarray:
    """(H, W) indices into LABELMAP: four blocks plus a scrap pixel."""
    names = np.arange(len(LABELMAP))
    grid = np.random.default_rng(seed).permutation(names[:4]).reshape(2, 2)
    out = np.kron(grid, np.ones((H // 2, W // 2), int))
    out[0, 0] = 4
    return out


def _expected(entries: np.ndarray) -> np.ndarray:
    lut = np.array([TO_ID[n] for n in LABELMAP], np.uint8)
    return lut[entries]


def write_cvat(root: Path, n: int = 3, ext: str = ".jpg", labelmap: str | None = None) -> dict:
    """A tiny CVAT Segmentation Mask 1.1 export; returns {id: expected (H, W) class ids}."""
    colours = np.array(list(LABELMAP.values()), np.uint8)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if labelmap is None:
        labelmap = "# label:color_rgb:parts:actions\n" + "".join(
            f"{k}:{r},{g},{b}::\n" for k, (r, g, b) in LABELMAP.items()
        )
    (root / "labelmap.txt").write_text(labelmap)
    expected = {}
    for i in range(n):
        entries = _entries(i)
        photo = np.full((H, W, 3), 40 * i, np.uint8)
        Image.fromarray(photo).save(root / "JPEGImages" / f"img{i}{ext}")
        Image.fromarray(colours[entries]).save(root / "SegmentationClass" / f"img{i}.png")
        expected[f"img{i}"] = _expected(entries)
    (root / "ImageSets/Segmentation/default.txt").write_text("".join(f"{k}\n" for k in expected))
    return expected


def zip_dir(root: Path, out: Path, top: str | None = None, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                zf.write(path, f"{top}/{rel}" if top else rel)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out


def _check_export(source: Path, expected: dict, fmt: str = "cvat", classes=CLASSES) -> None:
    export = open_export(source, fmt, classes)
    assert [it.id for it in export.items] == sorted(expected)
    for item in export.items:
        rgb, size = export.read_image(item.image)
        assert rgb.shape == (H, W, 3) and size == (H, W)
        label = export.read_label(item, expect_size=size)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, expected[item.id])


@pytest.mark.parametrize("layout", ["dir", "zip", "zip-top-folder"])
def test_cvat_import(tmp_path: Path, layout: str) -> None:
    expected = write_cvat(tmp_path / "export")
    source = tmp_path / "export"
    if layout != "dir":
        top = "task_1-export" if layout == "zip-top-folder" else None
        source = zip_dir(source, tmp_path / "export.zip", top, {"__MACOSX/._x": b"junk"})
    _check_export(source, expected)
    export = open_export(source, "cvat", CLASSES)
    assert export.colours == {
        "lizard": (250, 220, 40),
        "Hand": (40, 200, 60),
        " color board ": (40, 90, 230),
        "background": (0, 0, 0),
    }
    ref = str(export.items[0].image)
    assert ref.startswith("zip:") == (layout != "dir") and ref.endswith("JPEGImages/img0.jpg")


@pytest.mark.parametrize("ext", [".JPG", ".jpeg", ".png", ".bmp", ".tif"])
def test_cvat_image_extensions(tmp_path: Path, ext: str) -> None:
    _check_export(tmp_path, write_cvat(tmp_path, n=2, ext=ext))


def test_cvat_without_imagesets_uses_all_labels(tmp_path: Path) -> None:
    expected = write_cvat(tmp_path, n=2)
    (tmp_path / "ImageSets/Segmentation/default.txt").unlink()
    _check_export(tmp_path, expected)


def test_other_txt_lists_are_merged(tmp_path: Path) -> None:
    expected = write_cvat(tmp_path, n=3)
    sets = tmp_path / "ImageSets/Segmentation"
    (sets / "default.txt").unlink()
    (sets / "train.txt").write_text("img0\nimg1\n")
    (sets / "val.txt").write_text("img1\n")
    _check_export(tmp_path, {k: v for k, v in expected.items() if k != "img2"})


def test_labelmap_names_not_in_params_are_ignored(tmp_path: Path, caplog) -> None:
    write_cvat(tmp_path, n=1)
    with caplog.at_level(logging.INFO):
        export = open_export(tmp_path, "cvat", CLASSES)
    assert export.read_label(export.items[0])[0, 0] == 255  # the scrap pixel
    assert sum("scrap" in r.message for r in caplog.records) == 1


def _write_voc(root: Path, classes_txt: list[str] | None = None) -> dict:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(3):
        index = np.zeros((H, W), np.uint8)
        index[2:6, 3:9] = 8  # cat
        index[7:, 9:] = 12  # dog
        index[1:7, 2] = 255  # void boundary
        index[0, 0] = 15  # person: not a params class
        img = Image.fromarray(index, mode="P")
        img.putpalette(np.array(voc_colormap(256), np.uint8).ravel().tolist())
        img.save(root / "SegmentationClass" / f"2007_{i:06d}.png")
        Image.fromarray(np.full((H, W, 3), 99, np.uint8)).save(
            root / f"JPEGImages/2007_{i:06d}.jpg"
        )
        expected[f"2007_{i:06d}"] = np.select(
            [index == 0, index == 8, index == 12], [2, 0, 1], 255
        ).astype(np.uint8)
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000000\n2007_000001\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    if classes_txt is not None:
        (root / "classes.txt").write_text("\n".join(classes_txt) + "\n")
    return expected


VOC_PARAMS = (ClassSpec("cat", "a cat"), ClassSpec("dog", "a dog"), ClassSpec("background", "bg"))


@pytest.mark.parametrize("layout", ["dir", "zip"])
def test_voc_import(tmp_path: Path, layout: str) -> None:
    expected = _write_voc(tmp_path / "VOC2012")
    source = tmp_path / "VOC2012"
    if layout == "zip":
        source = zip_dir(source, tmp_path / "voc.zip", "VOCdevkit/VOC2012")
    _check_export(source, expected, "voc", VOC_PARAMS)
    export = open_export(source, "voc", VOC_PARAMS)
    assert export.colours["cat"] == voc_colormap(9)[8] == (64, 0, 0)


def test_voc_with_classes_txt_and_rgb_labels(tmp_path: Path) -> None:
    names = list(VOC_CLASSES)
    names[8], names[12] = "Cat", "DOG"
    expected = _write_voc(tmp_path, names)
    # one label saved as an RGB colour PNG instead of a palette: decoded through the colours
    path = tmp_path / "SegmentationClass/2007_000001.png"
    Image.open(path).convert("RGB").save(path)
    assert Image.open(path).mode == "RGB"
    _check_export(tmp_path, expected, "voc", VOC_PARAMS)  # void colour (224,224,192) -> 255
    rgb = np.array(Image.open(path))
    rgb[0, :] = voc_colormap(30)[29]  # index 29 is not in the 21-name class list
    Image.fromarray(rgb).save(path)
    export = open_export(tmp_path, "voc", VOC_PARAMS, unknown_colour_max_pixels=15)
    r, g, b = voc_colormap(30)[29]
    with pytest.raises(InputError, match=rf"000001.png: colour \({r},{g},{b}\) is not in classes"):
        export.read_label(export.items[1])
    index = np.array(Image.open(tmp_path / "SegmentationClass/2007_000002.png"))
    index[:2] = 29
    img = Image.fromarray(index, mode="P")
    img.putpalette(np.array(voc_colormap(256), np.uint8).ravel().tolist())
    img.save(path)
    with pytest.raises(InputError, match="000001.png: index 29 is not in classes.txt .32 pixels"):
        export.read_label(export.items[1])


def test_parse_labelmap() -> None:
    text = "# comment\n\nbackground:0,0,0::\ncolor board:40,90,230:part1:action\n"
    assert parse_labelmap(text, "lm") == {"background": (0, 0, 0), "color board": (40, 90, 230)}
    for bad, why in [
        ("a:1,2::\n", "line 1: expected"),
        ("a:1,2,300::", "line 1: expected"),
        ("a:1,2,3::\nA:4,5,6::", "line 2: empty or duplicate label name"),
        ("a:1,2,3::\nb:1,2,3::", "line 2: colour .* twice"),
        (":1,2,3::", "line 1: empty"),
        ("# only\n", "labelmap is empty"),
    ]:
        with pytest.raises(InputError, match=f"^lm: {why}"):
            parse_labelmap(bad, "lm")


# --- bad input: each raises one line naming the file -------------------------------------------


def _raises(source: Path, match: str, fmt: str = "cvat", read: bool = False, max_px: int = 0):
    with pytest.raises(InputError) as err:
        export = open_export(source, fmt, CLASSES, unknown_colour_max_pixels=max_px)
        if read:
            for item in export.items:
                export.read_label(item, export.read_image(item.image)[1])
    msg = str(err.value)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


def test_missing_and_empty_labelmap(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=1)
    (tmp_path / "labelmap.txt").write_text("# nothing here\n\n")
    _raises(tmp_path, f"{tmp_path / 'labelmap.txt'}: labelmap is empty")
    (tmp_path / "labelmap.txt").unlink()
    _raises(tmp_path, f"{tmp_path / 'labelmap.txt'}: labelmap not found")


def test_params_class_missing_from_labelmap(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=1, labelmap="background:0,0,0::\nlizard:250,220,40::\n")
    _raises(tmp_path, "labelmap.txt: class 'Hand' from params is not in the labelmap")


def test_unknown_colour_above_limit_fails(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=2)
    path = tmp_path / "SegmentationClass/img1.png"
    rgb = np.array(Image.open(path))
    rgb[:5, :] = (12, 200, 7)  # 80 pixels
    rgb[11, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    msg = _raises(
        tmp_path, f"{path}: colour (12,200,7) is not in labelmap.txt (80 pixels", read=True
    )
    assert "1 more unknown values, 81 pixels in all" in msg
    export = open_export(tmp_path, "cvat", CLASSES, unknown_colour_max_pixels=81)
    label, unknown = export.decode_label_file(export.items[1].label)
    assert unknown == 81 and (label[:5] == 255).all() and label[11, 0] == 255
    assert export.decode_label_file(export.items[0].label)[1] == 0


def test_unknown_colour_pixel_count_uses_spaces(tmp_path: Path) -> None:
    root = tmp_path
    write_cvat(root, n=1)
    big = np.zeros((50, 80, 3), np.uint8)
    big[:, :] = (12, 200, 7)
    Image.fromarray(big).save(root / "SegmentationClass/img0.png")
    Image.fromarray(big).save(root / "JPEGImages/img0.jpg")
    _raises(root, "colour (12,200,7) is not in labelmap.txt (4 000 pixels)", read=True)


def test_label_and_image_size_differ(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=1)
    Image.fromarray(np.zeros((H, W + 1, 3), np.uint8)).save(tmp_path / "JPEGImages/img0.jpg")
    _raises(tmp_path, "img0.png: label is 16x12 but its image is 17x12", read=True)


def test_exif_rotated_photo_label_in_oriented_frame(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=1)
    img = Image.fromarray(np.zeros((W, H, 3), np.uint8))  # stored W high, H wide
    exif = img.getexif()
    exif[0x0112] = 6  # rotate: shown H high, W wide, like the label
    img.save(tmp_path / "JPEGImages/img0.jpg", exif=exif.tobytes())
    export = open_export(tmp_path, "cvat", CLASSES)
    rgb, size = export.read_image(export.items[0].image)
    assert rgb.shape[:2] == size == (H, W)
    export.read_label(export.items[0], size)  # matches: no error
    img.save(tmp_path / "JPEGImages/img0.jpg")  # no EXIF: the label no longer fits
    _raises(tmp_path, "label is 16x12 but its image is 12x16", read=True)


def test_label_without_image(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=2)
    (tmp_path / "JPEGImages/img1.jpg").unlink()
    _raises(tmp_path, f"{tmp_path / 'SegmentationClass/img1.png'}: label without an image")


def test_image_listed_without_label(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=2)
    (tmp_path / "SegmentationClass/img1.png").unlink()
    _raises(tmp_path, "JPEGImages/img1: image 'img1' is listed without a label")
    (tmp_path / "JPEGImages/img1.jpg").unlink()
    _raises(tmp_path, "ImageSets/Segmentation: image 'img1' is listed without a label")


def test_corrupt_image(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=2)
    data = (tmp_path / "JPEGImages/img1.jpg").read_bytes()
    (tmp_path / "JPEGImages/img1.jpg").write_bytes(data[: len(data) // 2])
    _raises(tmp_path, f"{tmp_path / 'JPEGImages/img1.jpg'}: cannot read image (", read=True)


def test_duplicate_ids(tmp_path: Path) -> None:
    write_cvat(tmp_path, n=2)
    (tmp_path / "ImageSets/Segmentation/default.txt").write_text("img0\nimg1\nimg0\n")
    _raises(tmp_path, "default.txt: id 'img0' is listed twice")
    (tmp_path / "ImageSets/Segmentation/default.txt").write_text("img0\nimg1\n")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "JPEGImages/img0.png")
    _raises(tmp_path, "duplicate id 'img0'")


def test_unlabelled_ids(tmp_path: Path) -> None:
    pool, gt = tmp_path / "unlabelled", tmp_path / "gt"
    pool.mkdir()
    gt.mkdir()
    for name in ("b.jpg", "a.PNG", "c.bmp", "notes.txt", ".hidden.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(pool / name, format="PNG")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(gt / "b.png")
    items = list_unlabelled(pool, gt, taken_ids=["img0"])
    assert [it.id for it in items] == ["a", "b", "c"]
    assert [it.gt is not None for it in items] == [False, True, False]
    assert list_unlabelled(pool, tmp_path / "nope")[1].gt is None
    with pytest.raises(InputError, match="b.jpg: unlabelled id 'b' is also a labelled image id"):
        list_unlabelled(pool, None, taken_ids=["b"])
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(pool / "b.png")
    with pytest.raises(InputError, match="duplicate id 'b'"):
        list_unlabelled(pool)
    with pytest.raises(InputError, match="missing: unlabelled image folder not found"):
        list_unlabelled(tmp_path / "missing")


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil", "a/../../b", "C:/x", "a\\..\\b"])
def test_unsafe_zip_is_refused(tmp_path: Path, member: str) -> None:
    write_cvat(tmp_path / "e", n=1)
    archive = zip_dir(tmp_path / "e", tmp_path / "e.zip", extra={member: b"x"})
    _raises(archive, f"{archive}: refusing zip with unsafe member path")


def test_bad_source_and_format(tmp_path: Path) -> None:
    _raises(tmp_path / "missing", "missing: dataset source not found")
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    _raises(tmp_path / "x.zip", "x.zip: cannot read zip")
    with pytest.raises(InputError, match="unknown dataset format 'coco'"):
        open_export(tmp_path, "coco", CLASSES)


# --- the CVAT exporter --------------------------------------------------------------------------


@pytest.mark.parametrize("out_name", ["out", "out.zip"])
@pytest.mark.parametrize("black_used", [False, True])
def test_cvat_export_round_trip(tmp_path: Path, out_name: str, black_used: bool) -> None:
    names = ["lizard", "hand", "color board", "background"]
    colours = [(250, 220, 40), (40, 200, 60), (40, 90, 230), (0, 0, 0) if black_used else (9, 9, 9)]
    rng = np.random.default_rng(3)
    maps = {f"im{i}": rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), (H, W)) for i in range(3)}
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(photo)
    items = [
        (k, np.zeros((H, W, 3), np.uint8) if k != "im2" else photo, v) for k, v in maps.items()
    ]
    out = tmp_path / out_name
    assert write_cvat_export(out, names, colours, items) == 3
    assert not list(tmp_path.glob(".*.tmp"))
    export = open_export(out, "cvat", [ClassSpec(n, n) for n in names])
    assert [it.id for it in export.items] == ["im0", "im1", "im2"]
    assert str(export.items[2].image).endswith("im2.png")
    for item in export.items:
        np.testing.assert_array_equal(export.read_label(item), maps[item.id])
    void = [c for n, c in parse_labelmap(_read_labelmap(out), "lm").items() if n == "void"]
    assert void == [(255, 255, 255)] if black_used else void == [(0, 0, 0)]


def _read_labelmap(out: Path) -> str:
    if out.suffix == ".zip":
        return zipfile.ZipFile(out).read("labelmap.txt").decode()
    return (out / "labelmap.txt").read_text()


def test_cvat_export_rejects_bad_items(tmp_path: Path) -> None:
    bad_label = np.full((H, W), 7, np.uint8)
    with pytest.raises(ValueError, match="outside"):
        write_cvat_export(
            tmp_path / "o",
            ["a", "b"],
            [(1, 1, 1), (2, 2, 2)],
            [("x", np.zeros((H, W, 3), np.uint8), bad_label)],
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    item = ("x", np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="bad or duplicate export id 'x'"):
        write_cvat_export(tmp_path / "o.zip", ["a"], [(1, 1, 1)], [item, item])
    assert not list(tmp_path.iterdir())
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(ValueError, match="size != label"):
        write_cvat_export(tmp_path / "o", ["a"], [(1, 1, 1)], [("y", tmp_path / "p.png", item[2])])
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="distinct colour"):
        write_cvat_export(tmp_path / "o", ["a", "b"], [(1, 1, 1), (1, 1, 1)], [])
