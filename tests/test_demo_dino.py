"""Stage demo_dino on a tiny corpus: weights that the dino backbone loads, and its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import load_stage, repo_params

from opensam.model.dino import DINO_TINY, DinoTower, create_dino


def test_demo_dino_stage_on_a_tiny_corpus(tmp_path: Path) -> None:
    raw = repo_params(image_size=64)
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
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out, metrics = tmp_path / "demo_dino.pt", tmp_path / "demo_dino.json"
    argv = [
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--live",
        str(tmp_path / "live"),
        "--params",
        str(params),
    ]
    assert load_stage("demo_dino").main(argv) == 0
    report = json.loads(metrics.read_text())
    assert report["steps"] == 2 and report["heldout"]["images"] > 0
    assert 0 <= report["heldout"]["prototype_accuracy"] <= 100
    tower = DinoTower(create_dino(DINO_TINY, str(out)))  # dino.pretrained: the stage's file
    with torch.no_grad():
        assert tower(torch.rand(1, 3, 256, 256)).shape == (1, 128, 32, 32)  # stride 8
