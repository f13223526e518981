"""Tests of the procedural demo data (opensam.demo.dataset) and its stage script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_stage
from PIL import Image

from opensam.constants import IGNORE_INDEX
from opensam.demo import dataset as demo
from opensam.errors import InputError

W, H = 160, 107


def _parse_labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "# label:color_rgb:parts:actions"
    colours = {}
    for line in lines[1:]:
        name, rgb, parts, actions = line.split(":")
        assert name and parts == "" and actions == ""
        r, g, b = (int(v) for v in rgb.split(","))
        colours[(r, g, b)] = name
    return colours


def _colour_ids(png: Path, colours: dict[tuple[int, int, int], str]) -> np.ndarray:
    """An RGB colour mask -> class ids (H, W); fails on colours not in the labelmap."""
    rgb = np.asarray(Image.open(png))
    assert rgb.ndim == 3 and rgb.shape[2] == 3, f"{png} is not an RGB mask"
    ids = np.full(rgb.shape[:2], -1, np.int32)
    for colour, name in colours.items():
        ids[(rgb == colour).all(-1)] = demo.CLASS_NAMES.index(name) if name != "scrap" else 255
    assert (ids >= 0).all(), f"{png}: colours outside labelmap.txt"
    return ids


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    demo.generate_demo(out, labelled=3, unlabelled=2, seed=7, width=W, height=H, workers=1)
    return out


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_render_scene_is_deterministic_by_seed() -> None:
    img1, lab1 = demo.render_scene(np.random.default_rng([1, 0, 4]), W, H)
    img2, lab2 = demo.render_scene(np.random.default_rng([1, 0, 4]), W, H)
    img3, lab3 = demo.render_scene(np.random.default_rng([2, 0, 4]), W, H)
    assert img1.shape == (H, W, 3) and img1.dtype == np.uint8
    assert lab1.shape == (H, W) and lab1.dtype == np.uint8
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(lab1, lab2)
    assert not np.array_equal(lab1, lab3)
    assert np.abs(img1.astype(int) - img3.astype(int)).mean() > 5


def test_export_layout_is_a_valid_cvat_export(export: Path) -> None:
    colours = _parse_labelmap(export / "labelmap.txt")
    assert set(colours.values()) == {"background", "lizard", "hand", "color board", "scrap"}
    assert demo.LABELMAP["background"] == (0, 0, 0)
    ids = (export / "ImageSets/Segmentation/default.txt").read_text().split()
    assert ids == ["lz0000", "lz0001", "lz0002"]
    for i in ids:
        with Image.open(export / "JPEGImages" / f"{i}.jpg") as jpg:
            assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (W, H)
        with Image.open(export / "SegmentationClass" / f"{i}.png") as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (W, H)
        _colour_ids(export / "SegmentationClass" / f"{i}.png", colours)
    assert sorted(p.name for p in (export / "JPEGImages").iterdir()) == [f"{i}.jpg" for i in ids]
    assert not list(export.parent.glob(".*.tmp")), "temporary output left behind"


def test_unlabelled_photos_have_hidden_ground_truth(export: Path) -> None:
    colours = _parse_labelmap(export / "labelmap.txt")
    photos = sorted(p.stem for p in (export / "unlabelled").glob("*.jpg"))
    assert photos == ["ul0000", "ul0001"]
    assert sorted(p.stem for p in (export / "unlabelled_gt").glob("*.png")) == photos
    for name in photos:
        ids = _colour_ids(export / "unlabelled_gt" / f"{name}.png", colours)
        assert ids.shape == (H, W) and set(np.unique(ids)) >= {0, 1, 2, 3}
    # The unlabelled photos are not copies of the labelled ones.
    a = np.asarray(Image.open(export / "unlabelled/ul0000.jpg"), np.int16)
    b = np.asarray(Image.open(export / "JPEGImages/lz0000.jpg"), np.int16)
    assert np.abs(a - b).mean() > 5


def test_all_classes_present_with_plausible_fractions(export: Path) -> None:
    colours = _parse_labelmap(export / "labelmap.txt")
    for png in sorted((export / "SegmentationClass").glob("*.png")):
        ids = _colour_ids(png, colours)
        frac = np.bincount(ids.ravel(), minlength=256) / ids.size
        assert 0.03 <= frac[0] <= 0.2, f"{png.name}: lizard {frac[0]:.3f}"
        assert 0.03 <= frac[1] <= 0.2, f"{png.name}: hand {frac[1]:.3f}"
        assert 0.03 <= frac[2] <= 0.15, f"{png.name}: board {frac[2]:.3f}"
        assert frac[3] >= 0.3, f"{png.name}: background {frac[3]:.3f}"
        assert frac[IGNORE_INDEX] <= 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_fractions_at_full_size(seed: int) -> None:
    fracs = []
    for i in range(2):
        _, label = demo.render_scene(np.random.default_rng([seed, 0, i]), 1024, 683)
        fracs.append(np.bincount(label.ravel(), minlength=256)[:4] / label.size)
    frac = np.array(fracs)
    assert (frac[:, :3] >= 0.04).all() and (frac[:, :3] <= 0.17).all(), frac
    assert (frac[:, 3] >= 0.35).all(), frac


def test_output_is_byte_identical_across_runs_and_workers(export: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    demo.generate_demo(again, labelled=3, unlabelled=2, seed=7, width=W, height=H, workers=2)
    first, second = _files(export), _files(again)
    assert first.keys() == second.keys()
    for name, data in first.items():
        assert data == second[name], f"{name} differs between runs"


def test_different_seed_gives_different_photos(export: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    demo.generate_demo(other, labelled=3, unlabelled=2, seed=8, width=W, height=H, workers=1)
    for name in ("JPEGImages/lz0000.jpg", "SegmentationClass/lz0001.png", "unlabelled/ul0001.jpg"):
        assert (export / name).read_bytes() != (other / name).read_bytes()


def test_failure_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    calls = []

    def render_then_fail(rng: np.random.Generator, width: int, height: int) -> tuple:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint8)

    monkeypatch.setattr(demo, "render_scene", render_then_fail)
    with pytest.raises(RuntimeError):
        demo.generate_demo(out, labelled=3, unlabelled=1, seed=0, width=W, height=H, workers=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_label_to_rgb_uses_labelmap_colours() -> None:
    label = np.array([[0, 1], [2, 3], [IGNORE_INDEX, 3]], np.uint8)
    rgb = demo.label_to_rgb(label)
    assert rgb.shape == (3, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == demo.LABELMAP["lizard"]
    assert tuple(rgb[0, 1]) == demo.LABELMAP["hand"]
    assert tuple(rgb[1, 0]) == demo.LABELMAP["color board"]
    assert tuple(rgb[1, 1]) == demo.LABELMAP["background"]
    assert tuple(rgb[2, 0]) == demo.LABELMAP["scrap"]


def _write_params(path: Path, **demo_params: int) -> Path:
    params = {
        "seed": 5,  # the training seed: the demo ignores it
        "classes": [{"name": n, "prompt": f"a {n}"} for n in demo.CLASS_NAMES],
        "demo": {
            "labelled": 2,
            "unlabelled": 1,
            "width": W,
            "height": H,
            "seed": 3,
            **demo_params,
        },
    }
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_main_writes_the_export(tmp_path: Path) -> None:
    stage = load_stage("demo_data")
    params = _write_params(tmp_path / "params.yaml")
    out = tmp_path / "data" / "demo"
    assert stage.main(["--out", str(out), "--params", str(params)]) == 0
    assert (out / "ImageSets/Segmentation/default.txt").read_text().split() == ["lz0000", "lz0001"]
    assert sorted(p.name for p in (out / "SegmentationClass").iterdir()) == [
        "lz0000.png",
        "lz0001.png",
    ]
    assert [p.name for p in (out / "unlabelled").iterdir()] == ["ul0000.jpg"]
    assert [p.name for p in (out / "unlabelled_gt").iterdir()] == ["ul0000.png"]
    # The stage passes demo.seed: the photos are those of generate_demo with that seed.
    ref = tmp_path / "ref"
    demo.generate_demo(ref, 2, 1, seed=3, width=W, height=H, workers=1)
    assert _files(out) == _files(ref)


@pytest.mark.parametrize("bad", [{"labelled": 0}, {"unlabelled": -1}, {"width": 8}])
def test_stage_main_rejects_bad_params(tmp_path: Path, bad: dict[str, int]) -> None:
    stage = load_stage("demo_data")
    params = _write_params(tmp_path / "params.yaml", **bad)
    with pytest.raises(InputError, match="params.yaml: demo"):
        stage.main(["--out", str(tmp_path / "out"), "--params", str(params)])
    assert not (tmp_path / "out").exists()
