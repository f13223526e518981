"""The demo's SAM stand-in: its corpus and targets, the boundary net, the regions it gives, the
``demo_sam`` stage (which must never read the demo photos or their labels) and the generator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, load_stage, repo_params

from opensam.config import MasksParams, SamParams
from opensam.demo.boundaries import (
    CORPUS_KIND,
    BoundaryConfig,
    border_target,
    pretrain_boundaries,
    render_boundary_corpus,
)
from opensam.demo.captions import CORPUS_KIND as CLIP_KIND
from opensam.demo.scene import PARTS, render_scene, render_scene_objects
from opensam.errors import InputError
from opensam.masks.boundaries import (
    BoundaryNet,
    load_boundary_net,
    predict_boundaries,
    regions_from_boundaries,
    save_boundary_net,
)
from opensam.masks.generators import build_generator, store_attrs
from opensam.runtime import save_torch


def test_objects_map_is_of_the_same_photo_and_names_no_class() -> None:
    img, label = render_scene(np.random.default_rng(5), 160, 107)
    img2, segments = render_scene_objects(np.random.default_rng(5), 160, 107)
    assert np.array_equal(img, img2)
    objects = segments // PARTS
    # the lizard, hand and chart are objects 1..3 wherever the label shows them; scraps 4..
    for obj, cls in ((1, 0), (2, 1), (3, 2)):
        assert np.array_equal(objects == obj, label == cls)
    assert set(np.unique(objects[label == 255])) <= set(range(4, 64))
    chart_parts = np.unique(segments[objects == 3] % PARTS)
    assert len(chart_parts) > 10  # the frame and its visible patches are parts of one object


def test_border_target_marks_objects_1_and_parts_half() -> None:
    seg = np.zeros((6, 8), np.int64)
    seg[:, 4:] = 1 * PARTS  # another object on the right
    seg[3:, 4:] = 1 * PARTS + 1  # its lower part
    t = border_target(seg)
    assert np.all(t[:, 3:5] == 1.0)  # both pixels of an object border
    assert np.all(t[2:4, 5:] == 0.5) and t[2, 4] == 1.0  # a part border, object border wins
    assert np.all(t[:, :3] == 0) and np.all(t[0, 5:] == 0)


def test_corpus_has_its_own_generator_key() -> None:
    # kinds 0 and 1 are the demo's labelled and unlabelled photos (demo.dataset)
    assert CORPUS_KIND not in (0, 1, CLIP_KIND)
    images, segments = render_boundary_corpus(3, 2, 64, render_hw=(54, 80))
    again, _ = render_boundary_corpus(3, 2, 64, render_hw=(54, 80))
    other, _ = render_boundary_corpus(4, 2, 64, render_hw=(54, 80))
    assert images.shape == (2, 64, 64, 3) and segments.shape == (2, 64, 64)
    assert np.array_equal(images, again) and not np.array_equal(images, other)


def _two_boxes() -> np.ndarray:
    """A 64² boundary map: a wall above every level at x = 32, a weak one at y = 32 on the left."""
    b = np.full((64, 64), 0.02, np.float32)
    b[:, 31:33] = 0.99
    b[31:33, :31] = 0.4
    return b


def test_regions_are_nested_levels_of_the_merge_tree() -> None:
    ms = regions_from_boundaries(_two_boxes(), pps=16)
    areas = sorted(ms.area.tolist(), reverse=True)
    # whole left half, right half, and the two parts of the left half; no whole image (the wall
    # is above every level), each region once
    assert len(ms) == 4
    assert areas[0] == areas[1] and areas[2] == areas[3] and areas[2] * 2 == areas[0]
    assert np.array_equal(ms.area, np.sort(ms.area)[::-1])  # largest first
    assert ms.masks.any(0).all()  # every pixel is in some region


def test_pps_selects_regions_like_sams_point_grid() -> None:
    b = _two_boxes()
    b[4:10, 4:10] = 0.0
    b[3, 3:11] = b[10, 3:11] = b[3:11, 3] = b[3:11, 10] = 0.9  # a small box in a corner
    fine, coarse = regions_from_boundaries(b, pps=16), regions_from_boundaries(b, pps=2)
    small = (fine.area < 100).any()
    assert small and not (coarse.area < 100).any()  # a 2x2 grid misses the small box ...
    assert len(coarse) < len(fine)
    big = regions_from_boundaries(b, pps=16, min_region_area=100)
    assert big.area.min() >= 100  # ... and min_region_area drops it


def test_net_shapes_and_checkpoint_round_trip(tmp_path: Path) -> None:
    net = BoundaryNet(4).eval()
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
    prob = predict_boundaries(net, image)  # padded to a multiple of 16 and cropped back
    assert prob.shape == (50, 70) and 0 <= prob.min() and prob.max() <= 1
    path = tmp_path / "demo_sam.pt"
    save_torch(save_boundary_net(net, {"seed": 2}), path)
    loaded = load_boundary_net(path)
    assert np.allclose(predict_boundaries(loaded, image), prob, atol=1e-6)


def test_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="demo SAM checkpoint not found"):
        load_boundary_net(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_boundary_net(tmp_path / "junk.pt")
    save_torch({"kind": "something else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a demo SAM checkpoint"):
        load_boundary_net(tmp_path / "other.pt")
    net = BoundaryNet(4)
    ckpt = save_boundary_net(net, {})
    ckpt["state_dict"]["head.weight"] = torch.full_like(net.head.weight, float("nan"))
    save_torch(ckpt, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="NaN or infinite"):
        load_boundary_net(tmp_path / "nan.pt")


def test_pretraining_learns_borders_it_was_not_shown() -> None:
    torch.manual_seed(0)
    images, segments = render_boundary_corpus(7, 14, 64, render_hw=(54, 80))
    targets = np.stack([border_target(s) for s in segments])
    net = BoundaryNet(8)
    cfg = BoundaryConfig(steps=60, batch_size=4, crop_size=48, width=8, lr=0.01)

    def contrast() -> float:  # mean probability on held-out object borders minus elsewhere
        net.eval()
        prob = predict_boundaries(net, images[12:])
        net.train()
        return float(prob[targets[12:] == 1].mean() - prob[targets[12:] == 0].mean())

    before = contrast()
    losses = pretrain_boundaries(net, images[:12], targets[:12], cfg)
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert abs(before) < 0.1 and contrast() > 0.25  # scenes it never saw: it learned borders


def test_generator_builds_from_the_checkpoint_and_records_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "demo_sam.pt"
    save_torch(save_boundary_net(BoundaryNet(4), {}), path)
    masks = MasksParams(generator="demo_sam", checkpoint=str(path))
    gen = build_generator("demo_sam", 8, 0, masks, SamParams(), 64)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    ms = gen.generate(image)
    assert ms.image_shape == (64, 64) and ms.masks.dtype == bool
    attrs = store_attrs("demo_sam", 8, 0, 64, masks, SamParams())
    assert attrs["model"] == "demo-sam-boundary-unet" and len(str(attrs["checkpoint_sha256"])) == 64
    with pytest.raises(InputError, match="missing.pt: demo SAM checkpoint not found"):
        store_attrs(
            "demo_sam", 8, 0, 64, MasksParams(checkpoint=str(tmp_path / "missing.pt")), SamParams()
        )


def test_generators_of_one_checkpoint_share_each_image_hierarchy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ablation's cells cut one hierarchy per image: the net runs once per image however
    many (pps, area) generators ask, and each cut equals the uncached regions."""
    import opensam.masks.boundaries as mb

    path = tmp_path / "demo_sam.pt"
    torch.manual_seed(0)
    save_torch(save_boundary_net(BoundaryNet(4), {}), path)
    masks = MasksParams(generator="demo_sam", checkpoint=str(path))
    calls: list[int] = []
    real = mb.predict_boundaries
    monkeypatch.setattr(mb, "predict_boundaries", lambda net, im: calls.append(1) or real(net, im))
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8) for i in (1, 2)]
    cells = [(4, 0), (8, 0), (8, 20)]
    gens = [build_generator("demo_sam", p, a, masks, SamParams(), 64) for p, a in cells]
    for image in images:
        for gen, (pps, area) in zip(gens, cells, strict=True):
            got = gen.generate(image)
            want = regions_from_boundaries(real(gens[0].net, image), pps, area)
            assert np.array_equal(got.masks, want.masks) and np.array_equal(got.area, want.area)
    assert len(calls) == len(images)  # once per image, not per cell
    save_torch(save_boundary_net(BoundaryNet(4), {}), path)  # another net at the same path
    build_generator("demo_sam", 4, 0, masks, SamParams(), 64).generate(images[0])
    assert len(calls) == len(images) + 1  # other weights are never served old regions


def test_stage_depends_on_no_demo_data() -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["demo_sam"]
    deps = [str(d) for d in stage["deps"]]
    assert not [d for d in deps if d.startswith("data")], deps
    assert not [p for p in stage["params"] if str(p).startswith(("data", "classes"))]


def test_stage_runs_where_no_demo_photo_or_label_exists(tmp_path: Path) -> None:
    """The stage in an empty folder (no data/ at all): it cannot have read the demo."""
    raw = repo_params(image_size=64)
    raw["demo_sam"] = {
        **raw["demo_sam"],
        "scenes": 4,
        "heldout_scenes": 2,
        "render_width": 96,
        "steps": 2,
        "batch_size": 2,
        "crop_size": 32,
        "width": 4,
        "workers": 1,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    stage = load_stage("demo_sam")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        argv = ["--out", "m/demo_sam.pt", "--metrics", "m/demo_sam.json", "--live", "m/live"]
        assert stage.main(argv) == 0
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "params.yaml"]
    metrics = json.loads((tmp_path / "m" / "demo_sam.json").read_text())
    held = metrics["heldout"]
    assert set(held) == {"pps8", "pps16", "pps32", "pps64"}
    assert held["pps8"]["masks_per_image"] <= held["pps64"]["masks_per_image"]
    assert held["pps16"]["segments"] > 0
    assert isinstance(load_boundary_net(tmp_path / "m" / "demo_sam.pt"), BoundaryNet)
