"""opensam.apps.predict: batched prediction of photo folders, the output folder, the predict
stage.

A tiny opensam-tiny checkpoint (random init, image_size 64) is saved once per module; photos are
small synthetic files written into tmp_path.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CLASSES, PROMPTS, SIZE, assert_miou_is_the_mean_iou, load_stage, repo_params
from PIL import Image

from opensam.apps.cli import main as cli_main
from opensam.apps.photos import list_photos
from opensam.apps.predict import (
    FAILED_NAME,
    LABELS_DIR,
    MAX_OVERLAY_SIDE,
    OVERLAYS_DIR,
    Photo,
    blend_overlay,
    build_summary,
    class_percentages,
    infer_batch,
    predict_photos,
)
from opensam.apps.predict_setup import MaskChoice, choose_masks, overlay_colors
from opensam.apps.predictions_csv import CSV_NAME, csv_columns
from opensam.config import ClipParams, parse_params
from opensam.errors import InputError
from opensam.images import resize_label
from opensam.masks.superpixels import SuperpixelGenerator
from opensam.model.segmenter import build_model, load_checkpoint, save_checkpoint

COLORS = np.array([[250, 220, 40], [40, 200, 60], [40, 90, 230], [150, 60, 190]], np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model = build_model(ClipParams(pretrained=None), PROMPTS)
    save_checkpoint(path, model, CLASSES, ClipParams(pretrained=None), SIZE)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path):  # noqa: ANN201
    return load_checkpoint(checkpoint, expected_classes=CLASSES)[0]


@pytest.fixture()
def masks() -> SuperpixelGenerator:
    return SuperpixelGenerator(points_per_side=4, compactness=10.0, min_region_area=0)


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A blocky RGB test photo (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(0, 255, 3)
    return img


def write_photos(folder: Path) -> dict[str, tuple[int, int]]:
    """RGB JPEG, nested RGB PNG, grayscale and RGBA PNGs; returns id -> (H, W)."""
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(scene(72, 96, 0)).save(folder / "a.jpg", quality=95)
    Image.fromarray(scene(50, 40, 1)).save(folder / "sub" / "b.png")
    Image.fromarray(scene(60, 80, 2)[..., 0]).save(folder / "gray.png")
    rgba = np.dstack([scene(33, 65, 3), np.full((33, 65), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    return {"a": (72, 96), "sub__b": (50, 40), "gray": (60, 80), "rgba": (33, 65)}


def read_csv(out: Path) -> dict[str, dict[str, str]]:
    with (out / CSV_NAME).open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def run(model, photos_dir: Path, out: Path, masks=None, **kw):  # noqa: ANN001, ANN201
    listing = list_photos(photos_dir)
    return predict_photos(
        model, listing.photos, out, CLASSES, COLORS, SIZE, masks, refused=listing.refused, **kw
    )


def test_predict_writes_class_maps_overlays_and_csv(model, masks, tmp_path: Path) -> None:
    sizes = write_photos(tmp_path / "in")
    result = run(model, tmp_path / "in", tmp_path / "out", masks, batch_size=3)
    assert result.processed == 4 and not result.failed and result.skipped == 0
    rows = read_csv(tmp_path / "out")
    assert sorted(rows) == sorted(sizes)
    assert list(next(iter(rows.values()))) == csv_columns(CLASSES)
    for image_id, (h, w) in sizes.items():
        with Image.open(tmp_path / "out" / LABELS_DIR / f"{image_id}.png") as img:
            assert img.mode == "L" and img.size == (w, h)
            labels = np.asarray(img)
        with Image.open(tmp_path / "out" / OVERLAYS_DIR / f"{image_id}.jpg") as img:
            assert img.size == (w, h)
        row = rows[image_id]
        assert (int(row["width"]), int(row["height"])) == (w, h)
        pct = [float(row[f"pct_{c}"]) for c in CLASSES]
        np.testing.assert_allclose(pct, class_percentages(labels, 4), atol=1e-3)
        assert sum(pct) == pytest.approx(100.0, abs=0.01)
        assert 0.25 <= float(row["mean_confidence"]) <= 1.0  # max of 4 probabilities
        assert 0.0 <= float(row["low_conf_pct"]) <= 100.0
    assert (tmp_path / "out" / FAILED_NAME).read_text() == ""


def test_class_map_is_nearest_upscaling_of_the_model_prediction(model, masks, tmp_path) -> None:
    img = scene(90, 120, 5)
    Image.fromarray(img).save(tmp_path / "p.png")
    predict_photos(
        model, [Photo("p", tmp_path / "p.png")], tmp_path / "o", CLASSES, COLORS, SIZE, masks
    )
    small = np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    labels, conf = infer_batch(model, [(small, None)], masks)
    with Image.open(tmp_path / "o" / LABELS_DIR / "p.png") as out:
        np.testing.assert_array_equal(np.asarray(out), resize_label(labels[0], (90, 120)))
    row = read_csv(tmp_path / "o")["p"]
    assert float(row["mean_confidence"]) == pytest.approx(float(conf.mean()), abs=1e-5)
    assert float(row["low_conf_pct"]) == pytest.approx(100 * float((conf[0] < 0.5).mean()), 1e-3)


def test_masks_make_labels_constant_per_region(model, masks) -> None:
    img = scene(SIZE, SIZE, 7)
    regions = masks.generate(img).masks
    labels, _ = infer_batch(model, [(img, None)], masks)
    for region in regions:
        assert len(np.unique(labels[0][region])) == 1
    per_pixel, conf = infer_batch(model, [(img, None)], None)
    assert per_pixel.shape == (1, SIZE, SIZE) and conf.dtype == np.float32


def test_unreadable_files_are_listed_and_the_rest_go_on(model, tmp_path: Path) -> None:
    write_photos(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not a photo")
    (tmp_path / "in" / "fake.jpg").write_text("not a jpeg either")
    good = tmp_path / "in" / "a.jpg"
    (tmp_path / "in" / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    result = run(model, tmp_path / "in", tmp_path / "out")
    failed = (tmp_path / "out" / FAILED_NAME).read_text().splitlines()
    names = sorted(Path(line.split("\t")[0]).name for line in failed)
    assert names == ["fake.jpg", "notes.txt", "truncated.jpg"]
    assert all("\t" in line and line.split("\t")[1] for line in failed)
    assert result.processed == 4 and sorted(read_csv(tmp_path / "out")) == [
        "a",
        "gray",
        "rgba",
        "sub__b",
    ]
    assert not list((tmp_path / "out").rglob(".*.tmp"))  # no half-written outputs


@pytest.mark.slow
def test_huge_photo_keeps_original_size(model, masks, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    big = np.asarray(Image.fromarray(scene(40, 60, 9)).resize((3000, 2000)))
    Image.fromarray(big).save(tmp_path / "in" / "big.jpg", quality=90)
    result = run(model, tmp_path / "in", tmp_path / "out", masks)
    assert result.processed == 1
    with Image.open(tmp_path / "out" / LABELS_DIR / "big.png") as img:
        assert img.size == (3000, 2000)
    with Image.open(tmp_path / "out" / OVERLAYS_DIR / "big.jpg") as img:
        assert max(img.size) == MAX_OVERLAY_SIDE and img.size[1] == round(2000 * 2048 / 3000)


def test_rerun_skips_and_overwrite_redoes(model, tmp_path: Path) -> None:
    write_photos(tmp_path / "in")
    out = tmp_path / "out"
    run(model, tmp_path / "in", out)
    label = out / LABELS_DIR / "a.png"
    os.utime(label, ns=(1, 1))
    again = run(model, tmp_path / "in", out)
    assert (again.processed, again.skipped, len(again.rows)) == (0, 4, 4)
    assert label.stat().st_mtime_ns == 1
    (out / OVERLAYS_DIR / "gray.jpg").unlink()  # an incomplete photo is redone
    partial = run(model, tmp_path / "in", out)
    assert (partial.processed, partial.skipped) == (1, 3)
    redo = run(model, tmp_path / "in", out, overwrite=True)
    assert (redo.processed, redo.skipped) == (4, 0)
    assert label.stat().st_mtime_ns != 1
    assert sorted(read_csv(out)) == ["a", "gray", "rgba", "sub__b"]


def test_rerun_with_other_classes_is_refused(model, tmp_path: Path) -> None:
    write_photos(tmp_path / "in")
    run(model, tmp_path / "in", tmp_path / "out")
    listing = list_photos(tmp_path / "in")
    names = ["a", "b", "c", "d"]
    with pytest.raises(InputError, match="other classes"):
        predict_photos(model, listing.photos, tmp_path / "out", names, COLORS, SIZE)


def test_list_photos_folder_and_list_file(tmp_path: Path) -> None:
    write_photos(tmp_path / "in")
    Image.fromarray(scene(8, 8, 0)).save(tmp_path / "in" / "a.png")  # clashes with a.jpg
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"x")
    ids = [p.id for p in list_photos(tmp_path / "in").photos]
    assert ids == ["a_jpg", "a_png", "gray", "rgba", "sub__b"]
    listing = tmp_path / "in" / "sub" / "list.txt"
    listing.write_text("# photos\nb.png\n../gray.png\n\nmissing.jpg\nb.png\n")
    photos = list_photos(listing).photos
    assert [p.id for p in photos] == ["sub__b", "gray", "sub__missing"]
    assert photos[1].path.resolve() == (tmp_path / "in" / "gray.png").resolve()


@pytest.mark.parametrize("kind", ["empty", "no_images", "missing"])
def test_list_photos_errors(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "in"
    if kind != "missing":
        folder.mkdir()
    if kind == "no_images":
        (folder / "readme.md").write_text("x")
    with pytest.raises(InputError, match=str(folder)):
        list_photos(folder)


def test_blend_overlay_and_class_percentages() -> None:
    rgb = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 255], [1, 1, 3]], np.uint8)
    out = blend_overlay(rgb, labels, COLORS)
    np.testing.assert_allclose(out[0, 0], (100 + COLORS[0].astype(float)) / 2, atol=1)
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])  # 255 keeps the photo
    np.testing.assert_allclose(class_percentages(labels, 4), [100 / 6, 50, 0, 100 / 6])


def _stage_project(tmp_path: Path) -> Path:
    raw = repo_params(pps=4, predict={"batch_size": 2, "low_conf": 0.5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    prepared = tmp_path / "prepared"
    for sub in ("images", "unlabelled_gt"):
        (prepared / sub).mkdir(parents=True)
    ids = ["u0", "u1", "u2"]
    for i, image_id in enumerate(ids):
        Image.fromarray(scene(SIZE, SIZE, i)).save(prepared / "images" / f"{image_id}.png")
        gt = np.full((SIZE, SIZE), i % 4, np.uint8)
        gt[:4] = 255
        Image.fromarray(gt).save(prepared / "unlabelled_gt" / f"{image_id}.png")
    original = tmp_path / "orig_u1.jpg"
    Image.fromarray(scene(100, 150, 1)).save(original)
    splits = {
        "image_size": SIZE,
        "classes": CLASSES,
        "colors": COLORS.tolist(),
        "train": [],
        "val": [],
        "test": [],
        "unlabelled": ids,
        "unlabelled_gt": True,
        "sources": {"u1": str(original), "u2": "zip:x.zip!u2.jpg"},
    }
    (prepared / "splits.json").write_text(json.dumps(splits))
    return prepared


def test_predict_stage(checkpoint: Path, tmp_path: Path) -> None:
    prepared = _stage_project(tmp_path)
    out, metrics = tmp_path / "predictions", tmp_path / "predict.json"
    argv = [
        "--prepared",
        str(prepared),
        "--student",
        str(checkpoint),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    assert load_stage("predict").main(argv) == 0
    result = json.loads(metrics.read_text())
    assert result["images"] == 3 and result["failed"] == 0
    assert sum(result["class_fractions"].values()) == pytest.approx(100.0, abs=0.05)
    with Image.open(out / LABELS_DIR / "u1.png") as img:
        assert img.size == (150, 100)  # the original photo, not the prepared one
    gt_report = result["vs_hidden_gt"]
    assert gt_report["images"] == 3
    assert_miou_is_the_mean_iou(gt_report)


def test_build_summary_means(model, tmp_path: Path) -> None:
    write_photos(tmp_path / "in")
    result = run(model, tmp_path / "in", tmp_path / "out")
    summary = build_summary(result, CLASSES, COLORS, {"masks": "none"})
    rows = read_csv(tmp_path / "out").values()
    expected = np.mean([float(r["mean_confidence"]) for r in rows])
    assert summary["mean_confidence"] == pytest.approx(expected, abs=1e-4)
    assert summary["images"] == 4 and summary["masks"] == "none"
    assert set(summary["time_share_pct"]) == {"load", "masks", "model", "write"}


# --- the mask settings and colours of a predict run (opensam.apps.predict_setup) -----------------

TRAINED = {"generator": "superpixels", "pps": 16, "min_region_area": 0, "image_size": SIZE}


def test_choose_masks_flag_over_checkpoint_over_params(caplog: pytest.LogCaptureFixture) -> None:
    params = parse_params(repo_params(pps=32, min_region_area=5))
    with caplog.at_level(logging.INFO, logger="opensam.apps.predict_setup"):
        assert choose_masks({"masks": TRAINED}, params, checkpoint="s.pt") == MaskChoice(
            "superpixels", 16, 0
        )
    assert "masks pps = 16 (from s.pt)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opensam.apps.predict_setup"):
        choice = choose_masks({"masks": TRAINED}, params, "none", 8, None, "s.pt")
    assert choice == MaskChoice("none", 8, 0)
    assert "masks pps = 8 (from flag)" in caplog.text
    assert "masks min_region_area = 0 (from s.pt)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opensam.apps.predict_setup"):
        old = choose_masks({}, params, checkpoint="old.pt")  # a checkpoint without the record
    assert old == MaskChoice(params.masks.generator, 32, 5)
    assert "masks pps = 32 (from params.yaml (not recorded in the checkpoint))" in caplog.text


def test_overlay_colors_params_then_labelmap_then_palette() -> None:
    specs = repo_params()["classes"]
    specs[1]["color"] = specs[2]["color"] = None
    params = parse_params(repo_params(classes=specs))
    labelmap = [[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]]
    colors = overlay_colors(params, {"labelmap_colors": labelmap})
    assert colors.tolist() == [COLORS[0].tolist(), [2, 2, 2], [3, 3, 3], COLORS[3].tolist()]
    no_labelmap = overlay_colors(params, {})
    assert no_labelmap[1].any() and no_labelmap[1].tolist() != no_labelmap[2].tolist()


@pytest.fixture(scope="module")
def pps16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained on superpixel masks at pps 16, and a params.yaml saying pps 32."""
    root = tmp_path_factory.mktemp("pps16")
    model = build_model(ClipParams(pretrained=None), PROMPTS)
    save_checkpoint(
        root / "student.pt", model, CLASSES, ClipParams(pretrained=None), SIZE, masks=TRAINED
    )
    (root / "params.yaml").write_text(yaml.safe_dump(repo_params(pps=32, min_region_area=0)))
    return root / "student.pt"


def test_predict_uses_the_checkpoints_pps_over_params(
    pps16_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Trained at pps 16, params.yaml says 32: `opensam predict` uses 16 and logs why; --pps
    and --min-region-area override the checkpoint."""
    import opensam.apps.predict_setup as setup

    built: list[tuple] = []
    real = setup.build_generator
    monkeypatch.setattr(setup, "build_generator", lambda *a: built.append(a[:3]) or real(*a))
    (tmp_path / "in").mkdir()
    Image.fromarray(scene(40, 50, 0)).save(tmp_path / "in" / "p.png")
    argv = [
        "predict",
        str(tmp_path / "in"),
        "--checkpoint",
        str(pps16_checkpoint),
        "--params",
        str(pps16_checkpoint.parent / "params.yaml"),
    ]
    with caplog.at_level(logging.INFO):
        assert cli_main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert built == [("superpixels", 16, 0)]
    assert f"masks pps = 16 (from {pps16_checkpoint})" in caplog.text
    assert "pps 16" in caplog.text and "pps 32" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        over = ["--out", str(tmp_path / "b"), "--pps", "8", "--min-region-area", "10"]
        assert cli_main([*argv, *over]) == 0
    assert built[1] == ("superpixels", 8, 10)
    assert "masks pps = 8 (from flag)" in caplog.text
    assert "masks min_region_area = 10 (from flag)" in caplog.text
