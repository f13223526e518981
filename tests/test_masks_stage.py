"""The `masks` / `ablation_masks` stages and opensam.masks.generators, on tiny prepared projects."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import ROOT, load_stage
from PIL import Image

import opensam.masks.generators as mg
from opensam.errors import InputError
from opensam.masks.arrays import MaskSet
from opensam.masks.store import MaskStore, partial_path, summarize_store
from opensam.prepared import Prepared, read_prepared

masks_stage = load_stage("masks")
ablation_stage = load_stage("ablation_masks")

SIZE = 32

# Runs stages/masks.py as __main__ with the superpixel generator wrapped: each generate() call
# appends the image id to $COUNTER, then sleeps $DELAY seconds (so the test can kill it mid-run).
WRAPPER = """
import os, runpy, sys, time
import opensam.masks.generators as mg
inner = mg.MASK_GENERATORS["superpixels"]
class Counting:
    def __init__(self, gen):
        self.gen = gen
    def generate(self, image, original=None):
        with open(os.environ["COUNTER"], "a") as f:
            f.write(original.stem + "\\n")
        time.sleep(float(os.environ["DELAY"]))
        return self.gen.generate(image, original)
mg.MASK_GENERATORS["superpixels"] = lambda *a: Counting(inner(*a))
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_project(root: Path, n_train: int = 4, n_unl: int = 6, size: int = SIZE, **params_over):
    """A prepared-data folder (docs/architecture.md) and a params.yaml; returns their paths."""
    rng = np.random.default_rng(0)
    prepared = root / "data" / "prepared"
    (prepared / "images").mkdir(parents=True)
    ids = [f"img{i:02d}" for i in range(n_train + 3 + n_unl)]
    for i, image_id in enumerate(ids):
        yy, xx = np.mgrid[:size, :size]
        base = np.stack([xx * 7 + i * 13, yy * 5 + i * 29, (xx + yy) * 3], -1) % 256
        noise = rng.integers(0, 30, (size, size, 3))
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(
            prepared / "images" / f"{image_id}.png"
        )
    splits = {
        "image_size": size,
        "classes": ["a", "b"],
        "train": ids[:n_train],
        "val": ids[n_train : n_train + 2],
        "test": ids[n_train + 2 : n_train + 3],
        "unlabelled": ids[n_train + 3 :],
        "sources": {i: f"/photos/{i}.jpg" for i in ids},
    }
    (prepared / "splits.json").write_text(json.dumps(splits))
    params = {
        "image_size": size,
        "pps": 4,
        "min_region_area": 0,
        "ratio": 1,  # <= masks.max_ratio, checked at load
        "classes": [{"name": "a", "prompt": "a"}, {"name": "b", "prompt": "b"}],
        "masks": {"generator": "superpixels", "max_ratio": 1, "compactness": 10.0},
        "ablation": {"pps": [4], "min_region_area": [0], "images": 3},
    }
    params.update(params_over)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return prepared, root / "params.yaml", splits


def run_masks(root: Path, out: Path, prepared: Path | None = None) -> int:
    prepared = prepared or root / "data" / "prepared"
    argv = ["--prepared", str(prepared), "--out", str(out), "--params", str(root / "params.yaml")]
    return masks_stage.main(argv)


def store_content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {"attrs": {k: f.attrs[k] for k in f.attrs}}
        for image_id in f["images"]:
            g = f["images"][image_id]
            out[image_id] = {k: g[k][()].tolist() for k in g} | {"attrs": dict(g.attrs)}
    return out


def test_mask_image_ids_cover_labelled_and_max_ratio_pool() -> None:
    splits = Prepared(
        Path("p"),
        SIZE,
        ("a",),
        train=("t1", "t2"),
        val=("v",),
        test=("s",),
        unlabelled=tuple("abcdefg"),
    )
    assert mg.mask_image_ids(splits, 2) == ["t1", "t2", "v", "s", "a", "b", "c", "d"]
    assert mg.mask_image_ids(splits, 0) == ["t1", "t2", "v", "s"]
    assert mg.mask_image_ids(splits, 9)[-1] == "g"
    assert mg.ablation_image_ids(splits, 1) == ["t1"]
    assert mg.ablation_image_ids(splits, 5) == ["t1", "t2"]
    with pytest.raises(InputError, match="max_ratio"):
        mg.mask_image_ids(splits, -1)


def test_masks_stage_writes_reuses_and_rebuilds(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    prepared, params, splits = make_project(tmp_path)
    out = tmp_path / "data" / "masks.h5"
    assert run_masks(tmp_path, out) == 0
    store = MaskStore(out)
    expected = splits["train"] + splits["val"] + splits["test"] + splits["unlabelled"][:4]
    assert store.ids() == sorted(expected)
    attrs = store.attrs
    assert attrs["generator"] == "superpixels" and attrs["model"] == "slic"
    assert (attrs["pps"], attrs["min_region_area"], attrs["image_size"]) == (4, 0, SIZE)
    assert attrs["checkpoint_sha256"] == "" and attrs["format_version"] == 1
    ms = store.read(expected[0])
    np.testing.assert_array_equal(ms.masks.sum(0), 1)  # superpixels partition the image
    store.close()
    with caplog.at_level(logging.INFO):
        assert run_masks(tmp_path, out) == 0
    assert "up to date" in caplog.text
    caplog.clear()
    raw = yaml.safe_load(params.read_text())
    params.write_text(yaml.safe_dump({**raw, "pps": 6, "min_region_area": 20}))
    with caplog.at_level(logging.INFO):
        assert run_masks(tmp_path, out) == 0
    assert "up to date" not in caplog.text
    store = MaskStore(out)
    assert store.attrs["pps"] == 6 and store.attrs["min_region_area"] == 20
    assert min(store.read(i).area.min() for i in store.ids()) >= 20


@pytest.mark.parametrize("generator", ["superpixels", "regions"])
def test_worker_threads_write_the_same_store(
    tmp_path: Path, generator: str, caplog: pytest.LogCaptureFixture
) -> None:
    """masks.workers = 2 runs the CPU generator in two threads: the same datasets."""
    masks = {"generator": generator, "max_ratio": 1, "compactness": 10.0}
    make_project(tmp_path, masks=masks, pps=6)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    assert run_masks(tmp_path, one) == 0
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({**yaml.safe_load(params.read_text()), "masks": {**masks, "workers": 2}})
    )
    with caplog.at_level(logging.INFO):
        assert run_masks(tmp_path, two) == 0
    assert "in 2 worker threads" in caplog.text
    content = store_content(one)
    assert len(content) == 1 + 4 + 3 + 4 and store_content(two) == content


def test_masks_workers_must_be_positive(tmp_path: Path) -> None:
    make_project(tmp_path, masks={"generator": "superpixels", "max_ratio": 1, "workers": 0})
    with pytest.raises(InputError, match="masks.workers: must be >= 1, got 0"):
        run_masks(tmp_path, tmp_path / "m.h5")


def test_changed_image_is_recomputed(tmp_path: Path) -> None:
    prepared, _, splits = make_project(tmp_path)
    out = tmp_path / "m.h5"
    run_masks(tmp_path, out)
    before = MaskStore(out).read(splits["train"][0]).masks
    flipped = np.asarray(Image.open(prepared / "images" / f"{splits['train'][0]}.png"))[::-1]
    Image.fromarray(np.ascontiguousarray(flipped)).save(
        prepared / "images" / f"{splits['train'][0]}.png"
    )
    run_masks(tmp_path, out)
    after = MaskStore(out).read(splits["train"][0]).masks
    assert before.shape != after.shape or not np.array_equal(before, after)


def run_ablation(root: Path, prepared: Path, params: Path) -> int:
    out = root / "data" / "ablation"
    argv = ["--prepared", str(prepared), "--out", str(out), "--params", str(params)]
    return ablation_stage.main(argv)


def test_ablation_stage_writes_every_cell_of_the_grid(tmp_path: Path) -> None:
    grid = {"pps": [3, 5], "min_region_area": [0, 10], "images": 3}
    prepared, params, splits = make_project(tmp_path, n_train=5, ablation=grid)
    assert run_ablation(tmp_path, prepared, params) == 0
    out = tmp_path / "data" / "ablation"
    names = {f"pps{p}_mra{a}.h5" for p in (3, 5) for a in (0, 10)}
    assert {f.name for f in out.iterdir()} == names  # one store per cell, nothing else
    assert not (tmp_path / "data" / ".ablation.partial").exists()  # the staging folder is gone
    for p in (3, 5):
        for a in (0, 10):
            store = MaskStore(out / f"pps{p}_mra{a}.h5")
            assert store.ids() == sorted(splits["train"][:3])  # the first ablation.images
            assert (store.attrs["pps"], store.attrs["min_region_area"]) == (p, a)


def test_ablation_stage_resumes_a_killed_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC deletes the output folder before a rerun: the finished cells wait beside it and are
    reused, and nothing reaches the output folder before the whole grid is done."""
    grid = {"pps": [3, 5], "min_region_area": [0], "images": 3}
    prepared, params, _ = make_project(tmp_path, ablation=grid)
    inner = mg.MASK_GENERATORS["superpixels"]
    built: list[int] = []

    def second_cell_fails(settings: mg.GeneratorSettings) -> object:
        built.append(settings.pps)
        if settings.pps == 5:
            raise KeyboardInterrupt  # the run is killed in the second cell
        return inner(settings)

    monkeypatch.setitem(mg.MASK_GENERATORS, "superpixels", second_cell_fails)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(tmp_path, prepared, params)
    out, staging = tmp_path / "data" / "ablation", tmp_path / "data" / ".ablation.partial"
    assert not out.exists() and (staging / "pps3_mra0.h5").is_file()
    counted = lambda s: built.append(s.pps) or inner(s)  # noqa: E731
    monkeypatch.setitem(mg.MASK_GENERATORS, "superpixels", counted)
    built.clear()
    assert run_ablation(tmp_path, prepared, params) == 0
    assert built == [5]  # the finished cell is reused, never computed again
    assert {f.name for f in out.iterdir()} == {"pps3_mra0.h5", "pps5_mra0.h5"}
    assert not staging.exists()


@pytest.mark.parametrize(
    "pps,mra,match",
    [
        (0, 0, r"ablation\.pps: must be values in 1\.\.128, got \[4, 0\]"),  # params
        (129, 0, r"ablation\.pps: must be values in 1\.\.128"),
        (4, -1, r"ablation\.min_region_area"),
        # against the prepared images' size (32²), which params cannot know
        (4, SIZE * SIZE, r"ablation \(pps 4, min_region_area 1024\): min_region_area must "),
    ],
)
def test_ablation_stage_rejects_out_of_range_settings(tmp_path: Path, pps, mra, match) -> None:  # noqa: ANN001
    grid = {"pps": [4, pps], "min_region_area": [mra], "images": 3}
    prepared, params, _ = make_project(tmp_path, ablation=grid)
    with pytest.raises(InputError, match=match) as info:
        run_ablation(tmp_path, prepared, params)
    assert str(params) in str(info.value) and "\n" not in str(info.value)
    # every cell is checked before the first is computed: nothing written
    assert not (tmp_path / "data" / "ablation").exists()
    assert not (tmp_path / "data" / ".ablation.partial").exists()


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    prepared, params, splits = make_project(tmp_path, masks={"generator": "magic"})
    with pytest.raises(InputError, match=f"^{params}: masks.generator: unknown mask generator"):
        run_masks(tmp_path, tmp_path / "m.h5")
    make_project(tmp_path / "p2", min_region_area=SIZE * SIZE)
    with pytest.raises(InputError, match="min_region_area must be in"):
        run_masks(tmp_path / "p2", tmp_path / "m.h5")
    prepared3, _, splits3 = make_project(tmp_path / "p3")
    bad = prepared3 / "images" / f"{splits3['val'][0]}.png"
    Image.new("RGB", (SIZE + 1, SIZE)).save(bad)
    with pytest.raises(InputError, match=f"^{bad}: expected a 32x32 RGB image"):
        run_masks(tmp_path / "p3", tmp_path / "m3.h5")
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match=f"^{bad}: unreadable image"):
        run_masks(tmp_path / "p3", tmp_path / "m3.h5")
    (prepared3 / "splits.json").unlink()
    with pytest.raises(InputError, match="splits.json: not found"):
        run_masks(tmp_path / "p3", tmp_path / "m3.h5")


def test_sam_checkpoint_missing_is_an_input_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "sam.pth"
    make_project(
        tmp_path, masks={"generator": "sam", "max_ratio": 1}, sam={"checkpoint": str(ckpt)}
    )
    with pytest.raises(InputError, match=f"^{ckpt}: SAM checkpoint not found"):
        run_masks(tmp_path, tmp_path / "m.h5")


@pytest.mark.slow
def test_sam_generator_through_the_stage(tmp_path: Path) -> None:
    sam = {
        "model": "tiny",
        "checkpoint": None,
        "device": "cpu",
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
    }
    make_project(tmp_path, n_train=1, n_unl=0, pps=2, masks={"generator": "sam"}, sam=sam)
    out = tmp_path / "m.h5"
    assert run_masks(tmp_path, out) == 0
    store = MaskStore(out)
    attrs = store.attrs
    assert (attrs["generator"], attrs["model"], attrs["checkpoint_sha256"]) == ("sam", "tiny", "")
    assert json.loads(attrs["generator_config"])["pred_iou_thresh"] == 0.0
    assert len(store.ids()) == 4
    for image_id in store.ids():
        ms = store.read(image_id)
        assert ms.masks.shape[1:] == (SIZE, SIZE) and np.all(np.diff(ms.area) <= 0)


def test_checkpoint_sha256_is_cached(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights" * 1000)
    sha = mg.checkpoint_sha256(ckpt)
    assert sha == mg.file_sha256(ckpt)
    cache = tmp_path / ".w.pth.sha256"
    cached = json.loads(cache.read_text())
    cache.write_text(json.dumps({**cached, "sha256": "from-cache"}))
    assert mg.checkpoint_sha256(ckpt) == "from-cache"
    ckpt.write_bytes(b"other weights")  # size and mtime change: hashed again
    assert mg.checkpoint_sha256(ckpt) == mg.file_sha256(ckpt) != sha


def test_corrupt_final_and_partial_are_rebuilt(tmp_path: Path) -> None:
    make_project(tmp_path)
    out = tmp_path / "m.h5"
    out.write_bytes(b"garbage from an earlier run")
    partial_path(out).write_bytes(b"a torn partial")
    assert run_masks(tmp_path, out) == 0
    assert len(MaskStore(out).ids()) == 11 and not partial_path(out).exists()


class _Empty:
    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        return MaskSet.empty(image.shape[0], image.shape[1])


def test_images_without_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_project(tmp_path)
    monkeypatch.setitem(mg.MASK_GENERATORS, "superpixels", lambda *a: _Empty())
    out = tmp_path / "m.h5"
    assert run_masks(tmp_path, out) == 0
    store = MaskStore(out)
    assert all(store.read(i).masks.shape == (0, SIZE, SIZE) for i in store.ids())
    assert (store.read_winner(store.ids()[0]) == -1).all()
    assert summarize_store(out)["masks_max"] == 0


def test_error_exit_is_one_line(tmp_path: Path) -> None:
    prepared, params, _ = make_project(tmp_path, ablation={"pps": [0], "min_region_area": [0]})
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "ablation_masks.py"),
        "--prepared",
        str(prepared),
        "--out",
        str(tmp_path / "ablation"),
        "--params",
        str(params),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {params}: ablation.pps: must be values in 1..128, got [0]"
    ]


def _counted(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_kill_and_resume(tmp_path: Path) -> None:
    prepared, params, splits = make_project(tmp_path, n_train=8, n_unl=29)  # 40 images
    ids = mg.mask_image_ids(read_prepared(prepared), 1)
    assert len(ids) == 19 and len(splits["unlabelled"]) == 29
    params.write_text(params.read_text().replace("max_ratio: 1", "max_ratio: 4"))
    ids = mg.mask_image_ids(read_prepared(prepared), 4)
    assert len(ids) == 40
    out = tmp_path / "data" / "masks.h5"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = [
        sys.executable,
        str(wrapper),
        str(ROOT / "stages" / "masks.py"),
        "--prepared",
        str(prepared),
        "--out",
        str(out),
        "--params",
        str(params),
    ]
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    env = {**os.environ, "COUNTER": str(first), "DELAY": "0.2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(_counted(first)) < 8:  # the 8th call starts after image 7 is flushed
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "the stage made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # (c) nothing under the final name while killed
    with h5py.File(partial_path(out), "r") as f:
        done = {i for i in f["images"] if f["images"][i].attrs.get("complete")}
    assert len(done) >= 5
    env = {**os.environ, "COUNTER": str(second), "DELAY": "0"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    recomputed = set(_counted(second)) & done
    assert len(recomputed) <= 0.1 * len(done)  # (a) done images are not computed again
    assert sorted(set(_counted(first)) | set(_counted(second))) == sorted(ids)
    assert out.is_file() and not partial_path(out).exists()
    fresh = tmp_path / "fresh.h5"
    assert run_masks(tmp_path, fresh) == 0
    assert store_content(out) == store_content(fresh)  # (b) same store as one clean run
