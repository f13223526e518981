"""The demo CLIP: caption corpus, contrastive pretraining, and the demo_clip stage (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml

from opensam.config import ClipParams
from opensam.demo.captions import (
    CLASS_PROMPTS,
    Scene,
    caption,
    render_corpus_scene,
    sample_crop,
)
from opensam.demo.pretrain import (
    PretrainConfig,
    heldout_crops,
    pretrain_clip,
    zero_shot_accuracy,
)
from opensam.demo.scene import BACKGROUND, BOARD, CLASS_NAMES, HAND, LIZARD
from opensam.errors import InputError
from opensam.model.clip import create_clip, get_tokenizer
from opensam.model.segmenter import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSAM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def load_stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stage_demo_clip", ROOT / "stages/demo_clip.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_prompts_follow_the_class_ids_and_params() -> None:
    assert CLASS_NAMES == ("lizard", "hand", "color board", "background")
    assert CLASS_PROMPTS == ("a lizard", "a human hand", "a color board", "a background")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert tuple(c["prompt"] for c in params["classes"]) == CLASS_PROMPTS


def test_captions_name_what_is_visible() -> None:
    rng = np.random.default_rng(0)
    whole = np.array([400, 400, 400, 4000])
    lizard = np.full((20, 20), LIZARD, np.uint8)
    for _ in range(20):
        text = caption(rng, lizard, whole, {LIZARD: "brown"})
        assert "lizard" in text or "reptile" in text
        assert "hand" not in text and "color" not in text and "colour" not in text
    paper = np.full((20, 20), BACKGROUND, np.uint8)
    assert all("lizard" not in caption(rng, paper, whole, {}) for _ in range(20))
    both = np.full((20, 20), HAND, np.uint8)
    both[:8] = LIZARD
    texts = {caption(rng, both, whole, {}) for _ in range(40)}
    assert all("hand" in t or "fingers" in t for t in texts)
    assert any("holding" in t or "held by" in t for t in texts)


def test_corpus_scene_is_deterministic_and_differs_from_the_demo_photos() -> None:
    a = render_corpus_scene(3, 0, 32, (40, 60))
    b = render_corpus_scene(3, 0, 32, (40, 60))
    c = render_corpus_scene(4, 0, 32, (40, 60))
    assert a.image.shape == (32, 32, 3) and a.drawn.shape == (32, 32)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    image, text = sample_crop(np.random.default_rng(0), a, 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and text


def _toy_scene(rng: np.random.Generator, cls: int, size: int = 48) -> Scene:
    """A one-object scene: green mottled 'lizard' or a grid of bright 'colour board' patches."""
    if cls == LIZARD:
        image = np.empty((size, size, 3), np.uint8)
        image[:] = rng.integers([40, 90, 30], [90, 140, 60], (size, size, 3))
    else:
        cells = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        image = np.kron(cells, np.ones((size // 6, size // 6, 1), np.uint8))
    return Scene(image, np.full((size, size), cls, np.uint8), {})


def test_a_few_steps_beat_chance_with_the_right_prompt_order() -> None:
    """Two classes; a broken prompt wiring or a swapped class order would fail this."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [_toy_scene(rng, c) for c in (LIZARD, BOARD) * 8]
    held = [_toy_scene(rng, c) for c in (LIZARD, BOARD) * 6]
    model = create_clip("opensam-tiny", None)
    tok = get_tokenizer("opensam-tiny")
    cfg = PretrainConfig(steps=40, batch_size=16, crop_size=32, lr=2e-3, warmup_steps=5)
    losses = pretrain_clip(model, tok, train, cfg)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    images, targets = heldout_crops(held, [LIZARD, BOARD], 32, seed=1)
    assert set(targets.tolist()) == {0, 1}
    prompts = ["a lizard", "a color board"]
    acc, per = zero_shot_accuracy(model, tok, images, targets, prompts)
    assert acc > 0.8 and min(per) > 0.5
    swapped, _ = zero_shot_accuracy(model, tok, images, targets, prompts[::-1])
    assert swapped < 0.2


def _tiny_params(path: Path, **over: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["image_size"] = 48
    params["demo_clip"] = {
        "scenes": 3,
        "heldout_scenes": 2,
        "render_width": 72,
        "steps": 3,
        "batch_size": 4,
        "crop_size": 32,
        "warmup_steps": 1,
        "workers": 1,
        **over,
    }
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_writes_weights_that_load_through_the_user_path(tmp_path: Path) -> None:
    params = _tiny_params(tmp_path / "params.yaml")
    out, metrics, live = tmp_path / "models/demo_clip.pt", tmp_path / "m.json", tmp_path / "live"
    argv = ["--out", str(out), "--metrics", str(metrics), "--live", str(live)]
    assert load_stage().main([*argv, "--params", str(params)]) == 0
    report = json.loads(metrics.read_text())
    assert set(report) >= {"heldout", "final_loss"}
    assert 0 <= report["heldout"]["accuracy"] <= 100 and report["heldout"]["images"] > 0
    assert set(report["heldout"]["per_class"]) == set(CLASS_PROMPTS)
    assert (live / "plots/metrics/train/loss.tsv").is_file()
    state = torch.load(out, map_location="cpu", weights_only=True)  # a plain state_dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded = create_clip("opensam-tiny", str(out))  # clip.pretrained: <path>
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    model = build_model(ClipParams(pretrained=str(out)), list(CLASS_PROMPTS))
    assert model.text_embeddings.shape == (4, 128)


def test_stage_rejects_bad_params(tmp_path: Path) -> None:
    params = _tiny_params(tmp_path / "params.yaml", min_crop=0.9, max_crop=0.5)
    argv = ["--out", str(tmp_path / "w.pt"), "--metrics", str(tmp_path / "m.json")]
    with pytest.raises(InputError, match="min_crop"):
        load_stage().main([*argv, "--live", str(tmp_path / "l"), "--params", str(params)])
    assert not (tmp_path / "w.pt").exists()
