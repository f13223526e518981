"""Tests for opensam.data.prepare and the `prepare` stage (main() on a tiny project, and DVC)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_stage
from PIL import Image

from opensam.config import SplitParams
from opensam.data.cvat import write_cvat_export
from opensam.data.prepare import make_splits, resolve_split_sizes
from opensam.errors import InputError
from opensam.prepared import class_fractions

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["lizard", "hand", "color board", "background"]
COLOURS = [(250, 220, 40), (40, 200, 60), (40, 90, 230), (0, 0, 0)]
H, W = 30, 40  # photos are 40 wide, 30 high; prepared at 32 x 32


stage = load_stage("prepare")


def _scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo (H, W, 3) uint8 and its class map (H, W) uint8 with blocks of every class."""
    rng = np.random.default_rng(seed)
    label = np.full((H, W), 3, np.uint8)
    y, x = rng.integers(0, 10, 2)
    label[y : y + 15, x : x + 20] = 0
    label[20:, :12] = 1
    label[:8, 30:] = 2
    label[0, 0] = 255
    palette = np.array(COLOURS, np.uint8)
    photo = palette[np.minimum(label, 3)] // 2 + rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    return photo, label


def make_project(root: Path, n_labelled: int = 12, n_unlabelled: int = 6, **data) -> Path:
    """A tiny project: CVAT export, unlabelled photos with hidden GT, params.yaml."""
    items = [(f"img{i:02d}", *_scene(i)) for i in range(n_labelled)]
    write_cvat_export(root / "raw", NAMES, COLOURS, items)
    (root / "pool").mkdir()
    (root / "pool_gt").mkdir()
    for i in range(n_unlabelled):
        photo, label = _scene(100 + i)
        Image.fromarray(photo).save(root / "pool" / f"u{i:02d}.jpg", quality=95)
        Image.fromarray(np.array(COLOURS + [(0, 0, 0)] * 252, np.uint8)[label]).save(
            root / "pool_gt" / f"u{i:02d}.png"
        )
    params = {
        "seed": 5,  # the training seed: the splits ignore it (data.seed orders them)
        "image_size": 32,
        "classes": [{"name": n, "prompt": f"a {n}"} for n in NAMES],
        "data": {
            "source": "raw",
            "format": "cvat",
            "unlabelled": "pool",
            "unlabelled_gt": "pool_gt",
            "split": {"train": 6, "val": 2, "test": 2},
            "unknown_colour_max_pixels": 5,
            "seed": 3,
            **data,
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_stage(root: Path, monkeypatch: pytest.MonkeyPatch, workers: int = 1) -> dict:
    monkeypatch.chdir(root)
    monkeypatch.setenv("OPENSAM_WORKERS", str(workers))
    assert stage.main(["--out", "data/prepared", "--metrics", "metrics/data.json"]) == 0
    return json.loads((root / "metrics/data.json").read_text())


# --- splits and statistics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "n", "expected"),
    [
        ((60, 10, 8), 78, (60, 10, 8)),
        ((0.6, 0.2, 0.2), 10, (6, 2, 2)),
        ((0.29, 0.5, 0), 100, (29, 50, 0)),
        ((0.5, 0.3, 0.2), 5, (2, 1, 1)),
        ((3, 0.5, 1), 10, (3, 5, 1)),
    ],
)
def test_resolve_split_sizes(split: tuple, n: int, expected: tuple) -> None:
    sizes = resolve_split_sizes(n, SplitParams(*split), "src")
    assert (sizes.train, sizes.val, sizes.test) == expected


def test_resolve_split_sizes_errors() -> None:
    with pytest.raises(
        InputError, match=r"^src: 77 labelled images, but the split asks for 60\+10\+8 = 78$"
    ):
        resolve_split_sizes(77, SplitParams(60, 10, 8), "src")
    for bad in (2.5, -1):
        with pytest.raises(InputError, match="data.split.train: expected a count or a fraction"):
            resolve_split_sizes(10, SplitParams(bad, 1, 1), "src")


def test_make_splits_is_seeded_disjoint_and_pool_order_is_stable() -> None:
    labelled = [f"l{i}" for i in range(20)]
    pool = [f"u{i}" for i in range(30)]
    sizes = resolve_split_sizes(20, SplitParams(10, 3, 2), "src")
    a = make_splits(labelled, pool, sizes, seed=0)
    assert a == make_splits(labelled[::-1], pool[::-1], sizes, seed=0)  # input order irrelevant
    assert [len(a[s]) for s in ("train", "val", "test")] == [10, 3, 2]
    used = a["train"] + a["val"] + a["test"]
    assert len(set(used)) == 15 and set(used) <= set(labelled)
    assert sorted(a["unlabelled"]) == sorted(pool) and a["unlabelled"] != sorted(pool)
    other = make_splits(labelled, pool, resolve_split_sizes(20, SplitParams(4, 4, 4), "s"), 0)
    assert other["unlabelled"] == a["unlabelled"]  # the pool order ignores the split sizes
    assert other["train"] == a["train"][:4]  # same shuffle, sliced
    b = make_splits(labelled, pool, sizes, seed=1)
    assert b["train"] != a["train"] and b["unlabelled"] != a["unlabelled"]


def test_class_fractions() -> None:
    out = class_fractions(np.array([1, 2, 0, 3]), ["a", "b", "c", "d"])
    assert out == {"a": 16.67, "b": 33.33, "c": 0.0, "d": 50.0}
    assert class_fractions(np.zeros(2, np.int64), ["a", "b"]) == {"a": 0.0, "b": 0.0}


# --- the stage end to end -----------------------------------------------------------------------


def test_prepare_main_writes_the_documented_format(tmp_path: Path, monkeypatch) -> None:
    root = make_project(tmp_path)
    metrics = run_stage(root, monkeypatch)
    out = root / "data/prepared"
    index = json.loads((out / "splits.json").read_text())
    assert index["image_size"] == 32 and index["classes"] == NAMES
    assert index["colors"] == [list(c) for c in COLOURS]
    assert [len(index[s]) for s in ("train", "val", "test", "unlabelled")] == [6, 2, 2, 6]
    assert index["unlabelled_gt"] is True
    labelled = index["train"] + index["val"] + index["test"]
    assert set(index["sources"]) == set(labelled) | set(index["unlabelled"])
    assert index["sources"]["u00"] == "pool/u00.jpg"
    assert index["sources"][labelled[0]] == f"raw/JPEGImages/{labelled[0]}.jpg"
    assert len(list((out / "images").iterdir())) == 16
    for i in labelled + index["unlabelled"]:
        img = Image.open(out / "images" / f"{i}.png")
        assert img.mode == "RGB" and img.size == (32, 32)
    hist = np.zeros(4, np.int64)
    for i in index["train"]:
        label = Image.open(out / "labels" / f"{i}.png")
        assert label.mode == "L" and label.size == (32, 32)
        arr = np.asarray(label)
        assert set(np.unique(arr)) <= {0, 1, 2, 3, 255}
        hist += np.bincount(arr[arr != 255], minlength=4)
    assert sorted(p.stem for p in (out / "labels").iterdir()) == sorted(labelled)
    assert sorted(p.stem for p in (out / "unlabelled_gt").iterdir()) == sorted(index["unlabelled"])
    assert metrics["train"] == {"images": 6, "class_fractions": class_fractions(hist, NAMES)}
    assert set(metrics) == {"train", "val", "test", "unlabelled"}
    assert metrics["unlabelled"]["images"] == 6 and "class_fractions" in metrics["unlabelled"]
    assert abs(sum(metrics["val"]["class_fractions"].values()) - 100) < 0.05
    assert not list(root.rglob("*.tmp"))


def test_prepare_is_deterministic_across_workers(tmp_path: Path, monkeypatch) -> None:
    root = make_project(tmp_path, n_labelled=10, n_unlabelled=4)
    first = run_stage(root, monkeypatch, workers=1)
    files = {p.relative_to(root): p.read_bytes() for p in (root / "data").rglob("*") if p.is_file()}
    second = run_stage(root, monkeypatch, workers=2)
    again = {p.relative_to(root): p.read_bytes() for p in (root / "data").rglob("*") if p.is_file()}
    assert first == second and files == again


def test_prepare_from_zip_without_gt(tmp_path: Path, monkeypatch) -> None:
    root = make_project(tmp_path, n_labelled=10, n_unlabelled=3, unlabelled_gt="no_such_dir")
    shutil.make_archive(str(root / "raw"), "zip", root, "raw")  # single top folder "raw/"
    shutil.rmtree(root / "raw")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["source"] = "raw.zip"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = run_stage(root, monkeypatch)
    index = json.loads((root / "data/prepared/splits.json").read_text())
    assert (
        index["sources"][index["train"][0]] == f"zip:raw.zip!raw/JPEGImages/{index['train'][0]}.jpg"
    )
    assert index["unlabelled_gt"] is False and not (root / "data/prepared/unlabelled_gt").exists()
    assert metrics["unlabelled"] == {"images": 3}


def test_prepare_converts_odd_photos(tmp_path: Path, monkeypatch) -> None:
    root = make_project(
        tmp_path, n_labelled=6, n_unlabelled=5, split={"train": 6, "val": 0, "test": 0}
    )
    rgb = np.asarray(Image.open(root / "pool/u00.jpg"))
    Image.fromarray(rgb).convert("L").save(root / "pool/u00.jpg")
    Image.fromarray(rgb).convert("RGBA").save(root / "pool/u01.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "pool/u02.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "pool/u03.png")
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(rgb)))  # stored 30 x 40, shown 40 x 30
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(root / "pool/u04.jpg", exif=exif.tobytes())
    for name in ("u01", "u03"):
        (root / "pool" / f"{name}.jpg").unlink()
    run_stage(root, monkeypatch)  # the GT (40 x 30) must match every oriented photo
    for i in range(5):
        img = Image.open(root / f"data/prepared/images/u{i:02d}.png")
        assert img.mode == "RGB" and img.size == (32, 32)


def _bad_raw(root: Path, case: str) -> str:
    """Damage a tiny project; return the text the error must contain."""
    raw = root / "raw"
    if case == "too_few":
        return "raw: 12 labelled images, but the split asks for 8+2+3 = 13"
    if case == "corrupt":
        (raw / "JPEGImages/img03.jpg").write_bytes(b"\xff\xd8\xff garbage")
        return f"{Path('raw/JPEGImages/img03.jpg')}: cannot read image"
    if case == "size":
        Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)).save(raw / "JPEGImages/img05.jpg")
        return "raw/SegmentationClass/img05.png: label is 40x30 but its image is 40x32"
    if case == "colour":
        label = np.asarray(Image.open(raw / "SegmentationClass/img07.png")).copy()
        label[:3, :3] = (12, 200, 7)
        Image.fromarray(label).save(raw / "SegmentationClass/img07.png")
        return (
            "raw/SegmentationClass/img07.png: colour (12,200,7) is not in labelmap.txt (9 pixels)"
        )
    if case == "gt_size":
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "pool_gt/u02.png")
        return "pool_gt/u02.png: label is 5x5 but its image is 40x30"
    if case == "dup_unlabelled":
        shutil.copy(raw / "JPEGImages/img00.jpg", root / "pool/img00.jpg")
        return "pool/img00.jpg: unlabelled id 'img00' is also a labelled image id"
    if case == "missing_class":
        text = (raw / "labelmap.txt").read_text().replace("hand:", "paw:")
        (raw / "labelmap.txt").write_text(text)
        return "raw/labelmap.txt: class 'hand' from params is not in the labelmap"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["too_few", "corrupt", "size", "colour", "gt_size", "dup_unlabelled", "missing_class"]
)
def test_prepare_bad_input_leaves_nothing(tmp_path: Path, monkeypatch, case: str) -> None:
    test = 3 if case == "too_few" else 2  # otherwise all 12 labelled images are used
    root = make_project(tmp_path, split={"train": 8, "val": 2, "test": test})
    want = _bad_raw(root, case)
    monkeypatch.chdir(root)
    monkeypatch.setenv("OPENSAM_WORKERS", "2")
    with pytest.raises(InputError) as err:
        stage.main(["--out", "data/prepared", "--metrics", "metrics/data.json"])
    assert want in str(err.value) and "\n" not in str(err.value)
    assert not (root / "data/prepared").exists() and not (root / "metrics/data.json").exists()
    assert not list(root.rglob("*.tmp"))


def test_prepare_keeps_previous_output_on_failure(tmp_path: Path, monkeypatch, capsys) -> None:
    root = make_project(
        tmp_path, n_labelled=10, n_unlabelled=2, split={"train": 10, "val": 0, "test": 0}
    )
    run_stage(root, monkeypatch)
    before = (root / "data/prepared/splits.json").read_bytes()
    (root / "raw/JPEGImages/img01.jpg").write_bytes(b"broken")
    monkeypatch.setattr(
        sys, "argv", ["prepare.py", "--out", "data/prepared", "--metrics", "m.json"]
    )
    with pytest.raises(SystemExit) as exit_info:
        stage.run_main(stage.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: raw/JPEGImages/img01.jpg: cannot read image (" in err
    assert err.endswith(")\n") and err.count("error:") == 1
    assert (root / "data/prepared/splits.json").read_bytes() == before


def test_few_unknown_colours_become_ignore_with_one_warning(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    root = make_project(
        tmp_path, n_labelled=10, n_unlabelled=0, split={"train": 10, "val": 0, "test": 0}
    )
    for name in ("img02", "img04"):
        label = np.asarray(Image.open(root / f"raw/SegmentationClass/{name}.png")).copy()
        label[10:12, 10:12] = (12, 200, 7)  # 4 pixels <= unknown_colour_max_pixels (5)
        Image.fromarray(label).save(root / f"raw/SegmentationClass/{name}.png")
    with caplog.at_level(logging.WARNING):
        run_stage(root, monkeypatch)
    warnings = [r.getMessage() for r in caplog.records if "not in the labelmap" in r.getMessage()]
    assert len(warnings) == 1 and "img02.png" in warnings[0] and "img04.png" in warnings[0]


# --- DVC ----------------------------------------------------------------------------------------


def _dvc(proj: Path, *args: str) -> str:
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "OPENSAM_WORKERS": "1", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [str(dvc), *args], cwd=proj, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_dvc_repro_prepare_caches_and_reruns_on_param_change(tmp_path: Path) -> None:
    proj = make_project(tmp_path, n_labelled=10, n_unlabelled=2)
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    real["cmd"] = real["cmd"].replace("python ", f"{sys.executable} ", 1)
    real["deps"] = ["stages/prepare.py", "${data.source}", "${data.unlabelled}"]
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": real}}))
    (proj / "stages").mkdir()
    shutil.copy(ROOT / "stages/prepare.py", proj / "stages/prepare.py")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    _dvc(proj, "init", "-q")
    _dvc(proj, "repro", "prepare")
    index = json.loads((proj / "data/prepared/splits.json").read_text())
    assert index["image_size"] == 32 and len(index["train"]) == 6
    assert json.loads((proj / "metrics/data.json").read_text())["train"]["images"] == 6
    assert "didn't change" in _dvc(proj, "repro", "prepare")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["image_size"] = 48
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc(proj, "status", "prepare")
    assert "prepare" in status and "modified" in status and "image_size" in status
    out = _dvc(proj, "repro", "prepare")
    assert "Running stage 'prepare'" in out
    assert json.loads((proj / "data/prepared/splits.json").read_text())["image_size"] == 48
    assert Image.open(proj / f"data/prepared/images/{index['train'][0]}.png").size == (48, 48)
