"""Stage demo_dino on a tiny corpus: weights that the dino backbone loads, and its metrics; with
no DINO in model.backbone, a marker that loading refuses in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_stage, repo_params

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
