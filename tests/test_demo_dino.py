"""Stage demo_dino on a tiny corpus: weights that the dino backbone loads, and its metrics; with
no DINO in model.backbone, a marker that loading refuses in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_stage, repo_params

from opensam.demo.captions import Scene
from opensam.demo.dino_pretrain import region_probe_accuracy, scene_cells
from opensam.errors import InputError
from opensam.model.dino import DINO_TINY, DinoTower, create_dino


def stage_argv(tmp_path: Path, raw: dict) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return [
        "--out",
        str(tmp_path / "demo_dino.pt"),
        "--metrics",
        str(tmp_path / "demo_dino.json"),
        "--live",
        str(tmp_path / "live"),
        "--params",
        str(params),
    ]


def test_demo_dino_stage_on_a_tiny_corpus(tmp_path: Path) -> None:
    raw = repo_params(image_size=64)
    raw["model"] = {**raw["model"], "backbone": "clip+dino"}  # the concatenation reads it too
    raw["demo_dino"] = {
        **raw["demo_dino"],
        "scenes": 4,
        "heldout_scenes": 3,
        "steps": 2,
        "batch_size": 2,
        "global_crop": 32,
        "local_crop": 16,
        "local_views": 1,
        "out_dim": 32,
        "warmup_steps": 1,
        "workers": 1,
        "render_width": 96,
    }
    argv = stage_argv(tmp_path, raw)
    out, metrics = tmp_path / "demo_dino.pt", tmp_path / "demo_dino.json"
    assert load_stage("demo_dino").main(argv) == 0
    report = json.loads(metrics.read_text())
    assert report["trained"] and report["steps"] == 2 and report["heldout"]["images"] > 0
    assert 0 <= report["heldout"]["prototype_accuracy"] <= 100
    assert report["heldout"]["probe_scenes"] == 3
    for key in ("region_probe_accuracy", "random_init_region_probe_accuracy"):
        assert 0 <= report["heldout"][key] <= 100
    tower = DinoTower(create_dino(DINO_TINY, str(out)))  # dino.pretrained: the stage's file
    with torch.no_grad():
        assert tower(torch.rand(1, 3, 256, 256)).shape == (1, 128, 32, 32)  # stride 8


def test_demo_dino_trains_nothing_that_no_backbone_reads(tmp_path: Path) -> None:
    raw = repo_params(image_size=64)
    assert raw["model"]["backbone"] == "clip"  # the default: no stage reads the DINO weights
    raw["demo_dino"] = {**raw["demo_dino"], "steps": 10**6}  # would never end if it trained
    assert load_stage("demo_dino").main(stage_argv(tmp_path, raw)) == 0
    assert json.loads((tmp_path / "demo_dino.json").read_text()) == {
        "trained": False,
        "backbone": "clip",
    }
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["trained"] is False
    with pytest.raises(InputError, match=r"demo_dino\.pt: the demo DINO was not trained.*backbone"):
        create_dino(DINO_TINY, str(tmp_path / "demo_dino.pt"))


def test_region_probe_tells_classes_apart_where_regions_hold_them() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 64), generator=gen)
    labels[:, :5] = 255  # cells of another label are pooled into no region
    codes = torch.where(labels == 255, torch.full_like(labels, 4), labels)
    features = torch.nn.functional.one_hot(codes, 5).float()
    features[:, :5] = 1.0  # were they pooled, every region would mix them in
    assert region_probe_accuracy(features, labels, [0, 1, 2, 3]) == pytest.approx(1.0)


def test_region_probe_of_a_constant_map_is_chance() -> None:
    labels = (torch.arange(100) % 4).repeat(6, 1)
    constant = torch.nn.functional.normalize(torch.ones(6, 100, 8), dim=-1)
    # every region the same vector: all go to one prototype, one class of four right
    assert region_probe_accuracy(constant, labels, [0, 1, 2, 3]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="two scenes"):
        region_probe_accuracy(constant[:1], labels[:1], [0, 1, 2, 3])


def test_scene_cells_label_each_cell_by_its_centre() -> None:
    drawn = np.zeros((64, 64), np.uint8)
    drawn[:, 32:] = 2  # right half a hand
    scene = Scene(np.zeros((64, 64, 3), np.uint8), drawn, {})
    features, labels = scene_cells(create_dino(DINO_TINY, None), [scene, scene])
    assert features.shape == (2, 64, 128) and labels.shape == (2, 64)  # an 8x8 grid, stride 8
    assert torch.allclose(features.norm(dim=-1), torch.ones(2, 64))
    grid = labels[0].reshape(8, 8)
    assert (grid[:, :4] == 0).all() and (grid[:, 4:] == 2).all()
