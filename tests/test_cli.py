"""The ``opensam`` console script: ``predict`` and ``export-cvat`` end to end, and user errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import repo_params
from PIL import Image

from opensam.apps.cli import main
from opensam.apps.predict import LABELS_DIR, OVERLAYS_DIR, SUMMARY_NAME
from opensam.apps.predictions_csv import CSV_NAME
from opensam.config import ClassSpec, ClipParams, load_params
from opensam.data.importers import open_export
from opensam.model.segmenter import build_model, save_checkpoint

OPENSAM = Path(sys.executable).parent / "opensam"
SIZE = 64


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A params file (pps 4), a tiny checkpoint of its classes and one with other classes."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump(repo_params(pps=4)))
    params = load_params(root / "params.yaml")
    model = build_model(ClipParams(pretrained=None), params.prompts)
    save_checkpoint(
        root / "student.pt", model, params.class_names, ClipParams(pretrained=None), SIZE
    )
    other = ["cat", "dog", "bird", "sky"]
    save_checkpoint(root / "other.pt", model, other, ClipParams(pretrained=None), SIZE)
    return root


def photos(folder: Path, n: int = 4) -> list[tuple[int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(n):
        h, w = 40 + 7 * i, 90 - 9 * i
        rng = np.random.default_rng(i)
        img = np.repeat(rng.integers(0, 255, (h, 1, 3), dtype=np.uint8), w, axis=1)
        Image.fromarray(img).save(folder / f"img{i}.png")
        sizes.append((h, w))
    return sizes


def predict(project: Path, src: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "predict",
            str(src),
            "--out",
            str(out),
            "--checkpoint",
            str(project / "student.pt"),
            "--params",
            str(project / "params.yaml"),
            *extra,
        ]
    )


def test_console_script_help() -> None:
    top = subprocess.run([str(OPENSAM), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0
    assert all(cmd in top.stdout for cmd in ("predict", "export-cvat", "preset"))
    sub = subprocess.run(
        [str(OPENSAM), "predict", "--help"], capture_output=True, text=True, timeout=120
    )
    assert sub.returncode == 0
    options = ("--out", "--checkpoint", "--masks", "--pps", "--min-region-area", "--batch-size")
    for option in (*options, "--low-conf", "--overwrite"):
        assert option in sub.stdout


def test_predict_with_superpixels(project: Path, tmp_path: Path) -> None:
    sizes = photos(tmp_path / "in")
    assert predict(project, tmp_path / "in", tmp_path / "out", "--batch-size", "3") == 0
    for i, (h, w) in enumerate(sizes):
        with Image.open(tmp_path / "out" / LABELS_DIR / f"img{i}.png") as img:
            assert img.size == (w, h)
        assert (tmp_path / "out" / OVERLAYS_DIR / f"img{i}.jpg").is_file()
    summary = yaml.safe_load((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["masks"] == "superpixels" and summary["images"] == 4
    assert summary["classes"] == load_params(project / "params.yaml").class_names


def test_predict_low_conf_option(project: Path, tmp_path: Path) -> None:
    photos(tmp_path / "in", 2)
    assert (
        predict(project, tmp_path / "in", tmp_path / "lo", "--masks", "none", "--low-conf", "0.0")
        == 0
    )
    assert (
        predict(project, tmp_path / "in", tmp_path / "hi", "--masks", "none", "--low-conf", "1.0")
        == 0
    )
    for name, expected in (("lo", 0.0), ("hi", 100.0)):
        with (tmp_path / name / CSV_NAME).open(newline="") as f:
            assert {float(r["low_conf_pct"]) for r in csv.DictReader(f)} == {expected}


@pytest.mark.parametrize("case", ["empty", "inside", "classes", "all_fail"])
def test_predict_user_errors(
    project: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out, extra = tmp_path / "in", tmp_path / "out", ["--masks", "none"]
    src.mkdir()
    if case != "empty":
        photos(src, 1)
    if case == "inside":
        out = src / "predictions"
    if case == "classes":
        extra += ["--checkpoint", str(project / "other.pt")]
    if case == "all_fail":
        (src / "img0.png").write_bytes(b"\x89PNG broken")
    assert predict(project, src, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    expected = {
        "empty": "no image files",
        "inside": "inside the input folder",
        "classes": "differ",
        "all_fail": "no photo could be read",
    }[case]
    assert expected in err
    if case == "inside":
        assert not out.exists()


def _export(project: Path, tmp_path: Path, n: int, *extra: str) -> tuple[Path, list[dict]]:
    photos(tmp_path / "in", 5)
    assert predict(project, tmp_path / "in", tmp_path / "pred", "--masks", "none") == 0
    out = tmp_path / "export.zip"
    argv = ["export-cvat", str(tmp_path / "pred"), "--out", str(out), "--n", str(n)]
    assert main([*argv, "--prepared", str(tmp_path / "no_prepared"), *extra]) == 0
    with (tmp_path / "pred" / CSV_NAME).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_export_cvat_round_trip(project: Path, tmp_path: Path) -> None:
    out, rows = _export(project, tmp_path, 3)
    least = sorted(rows, key=lambda r: (float(r["mean_confidence"]), r["id"]))[:3]
    params = load_params(project / "params.yaml")
    export = open_export(out, "cvat", params.classes)
    assert sorted(it.id for it in export.items) == sorted(r["id"] for r in least)
    for item in export.items:
        with Image.open(tmp_path / "pred" / LABELS_DIR / f"{item.id}.png") as img:
            np.testing.assert_array_equal(export.read_label(item), np.asarray(img))
        image, size = export.read_image(item.image)
        assert size == export.read_label(item).shape
    assert export.colours == {c.name: tuple(c.color) for c in params.classes}


def test_export_cvat_uses_the_data_set_labelmap_colours(project: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    names = load_params(project / "params.yaml").class_names
    colours = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    splits = {"image_size": SIZE, "classes": names, "colors": colours}
    (prepared / "splits.json").write_text(json.dumps(splits))
    out, _ = _export(project, tmp_path, 2, "--prepared", str(prepared))
    with zipfile.ZipFile(out) as archive:
        labelmap = archive.read("labelmap.txt").decode()
    assert f"{names[0]}:1,2,3::" in labelmap and f"{names[3]}:10,11,12::" in labelmap
    export = open_export(out, "cvat", [ClassSpec(n, n) for n in names])
    assert len(export.items) == 2


def test_export_cvat_with_moved_photos(project: Path, tmp_path: Path) -> None:
    _export(project, tmp_path, 1)
    (tmp_path / "in").rename(tmp_path / "moved")
    argv = ["export-cvat", str(tmp_path / "pred"), "--out", str(tmp_path / "e2.zip"), "--n", "2"]
    assert main([*argv, "--prepared", str(tmp_path / "none")]) == 2
    assert (
        main([*argv, "--prepared", str(tmp_path / "none"), "--images", str(tmp_path / "moved")])
        == 0
    )
    assert zipfile.ZipFile(tmp_path / "e2.zip").testzip() is None
