"""Backbones (model.backbone), heads (model.head), frozen backbones and checkpoints that record
them. Real architectures are built with random weights (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opensam.config import ClipParams, DinoParams, ModelParams
from opensam.errors import InputError
from opensam.model.aggregation import aggregate_head_log_probs, aggregate_log_probs
from opensam.model.backbones import ConcatTower, build_tower, clip_dense_tower
from opensam.model.clip import create_visual
from opensam.model.clip_vit import OpenClipViTTower
from opensam.model.dino import DINO_TINY, DinoTower, create_dino, resolve_dino_weights
from opensam.model.heads import LinearHead, MlpHead, class_prototypes
from opensam.model.segmenter import build_model, load_checkpoint, save_checkpoint

CLIP = ClipParams(pretrained=None)
RANDOM_DINO = DinoParams(pretrained=None)
PROMPTS = ["a lizard", "a hand", "a background"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dim", "stride"), [("ViT-B-16", 512, 16), ("ViT-B-16-SigLIP", 768, 16)]
)
def test_clip_vit_towers_give_patch_maps(name: str, dim: int, stride: int) -> None:
    tower = clip_dense_tower(create_visual(name)).eval()
    assert tower.stride == stride and tower.embed_dim == dim  # type: ignore[attr-defined]
    with torch.no_grad():
        for side in (224, 256):
            out = tower(torch.randn(1, 3, side, side))
            assert out.shape == (1, dim, side // stride, side // stride)
            assert torch.isfinite(out).all()


def test_convnext_clip_tower_is_unchanged() -> None:
    tower = clip_dense_tower(create_visual("opensam-tiny"))
    assert type(tower).__name__ == "DenseImageTower" and tower.stride == 32  # type: ignore[attr-defined]


@pytest.mark.slow
def test_openclip_vit_last_block_is_attention_to_itself() -> None:
    """MaskCLIP's value path equals the last block's attention when each token may only attend
    to itself (computed independently with nn.MultiheadAttention and a diagonal mask)."""
    visual = create_visual("ViT-B-16").eval()
    tower = OpenClipViTTower(visual)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens, hw = tower._tokens(x)
        for block in list(visual.transformer.resblocks)[:-1]:
            tokens = block(tokens)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(tokens[:, 1:])
        n = y.shape[1]
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        self_only, _ = last.attn(y, y, y, attn_mask=mask, need_weights=False)
        expected = (visual.ln_post(self_only) @ visual.proj).transpose(1, 2).reshape(1, -1, *hw)
        torch.testing.assert_close(tower(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dim", "stride"),
    [
        (DINO_TINY, 128, 8),
        ("vit_small_patch14_dinov2.lvd142m", 384, 14),
        ("vit_base_patch14_dinov2.lvd142m", 768, 14),
        ("vit_small_patch16_dinov3.lvd1689m", 384, 16),
        ("vit_base_patch16_dinov3.lvd1689m", 768, 16),
    ],
)
def test_dino_towers_give_patch_maps(name: str, dim: int, stride: int) -> None:
    tower = DinoTower(create_dino(name, None))
    assert tower.stride == stride and tower.embed_dim == dim
    with torch.no_grad():
        for side in (224, 256):
            grid = round(side / stride)
            assert tower.grid_hw((side, side)) == (grid, grid)
            assert tower(torch.randn(1, 3, side, side)).shape == (1, dim, grid, grid)


def test_concat_map_is_two_unit_parts_on_the_dino_grid() -> None:
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tower = build_tower(
        "clip+dino",
        create_visual("opensam-tiny"),
        create_dino(DINO_TINY, None),
        norm,
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    )
    assert isinstance(tower, ConcatTower) and tower.stride == 8 and tower.embed_dim == 256
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 256, 8, 8)
    for part in (out[:, :128], out[:, 128:]):
        torch.testing.assert_close(part.norm(dim=1), torch.ones(2, 8, 8))
    x = torch.rand(1, 3, 64, 64)  # the DINO half sees the image in DINO's normalisation
    with torch.no_grad():
        direct = tower.dino(
            (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        )
        torch.testing.assert_close(tower((x - 0.5) / 0.25)[:, 128:], F.normalize(direct, dim=1))


@pytest.mark.parametrize("backbone", ["dino", "clip+dino"])
def test_frozen_backbone_gets_no_gradient(backbone: str) -> None:
    spec = ModelParams(backbone=backbone, head="mlp", freeze_backbone=True)
    model = build_model(CLIP, PROMPTS, spec=spec, dino=RANDOM_DINO).train()
    assert not model.tower.training  # stays in eval mode (no drop path)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.tower.parameters())
    assert model.head is not None
    assert all(p.grad is not None for p in model.head.parameters())


def test_fine_tuned_backbone_gets_gradient() -> None:
    model = build_model(CLIP, PROMPTS, spec=ModelParams(backbone="dino"), dino=RANDOM_DINO)
    model.train()(torch.rand(1, 3, 64, 64)).mean().backward()
    assert any(p.grad is not None for p in model.tower.parameters())


def test_linear_head_from_text_equals_the_text_classifier() -> None:
    """Started from the text embeddings, a linear head gives the zero-shot log-probabilities."""
    text = build_model(CLIP, PROMPTS)
    linear = build_model(CLIP, PROMPTS, spec=ModelParams(head="linear"))
    mlp = build_model(CLIP, PROMPTS, spec=ModelParams(head="mlp"))
    for other in (linear, mlp):  # random towers: give them the text model's weights and text
        other.tower.load_state_dict(text.tower.state_dict())
        other.set_class_embeddings(text.text_embeddings)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), text(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlp(x), text(x), atol=1e-5, rtol=1e-5)


def test_head_aggregation_matches_the_text_path_for_a_text_linear_head() -> None:
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(2, 8, 4, 4), dim=1)
    text = F.normalize(torch.randn(3, 8), dim=1)
    pool = torch.rand(2, 5, 4, 4)
    winner = torch.randint(-1, 5, (2, 32, 32))
    head = LinearHead(8, 3)
    head.init_from(text, 7.0)
    torch.testing.assert_close(
        aggregate_head_log_probs(emb, head, pool, winner, (32, 32)),
        aggregate_log_probs(emb, text, 7.0, pool, winner, (32, 32)),
        atol=1e-5,
        rtol=1e-5,
    )
    assert isinstance(MlpHead(8, 3, 4), LinearHead)


def test_class_prototypes_are_the_mean_labelled_embedding() -> None:
    emb = torch.zeros(1, 2, 2, 2)
    emb[0, 0, :, 0] = 1.0  # left column: e0; right column: e1
    emb[0, 1, :, 1] = 1.0
    labels = torch.full((1, 2, 2), 255, dtype=torch.int64)
    labels[0, :, 0] = 1
    labels[0, 0, 1] = 0
    protos = class_prototypes(lambda x: emb, [(torch.zeros(1, 3, 2, 2), labels)], 3)
    torch.testing.assert_close(protos, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize(
    "spec",
    [
        ModelParams(),
        ModelParams(backbone="dino", head="mlp", mlp_hidden=16),
        ModelParams(backbone="clip+dino", head="linear", freeze_backbone=True),
    ],
    ids=["clip", "dino", "clip+dino"],
)
def test_checkpoint_records_and_rebuilds_the_backbone(spec: ModelParams, tmp_path: Path) -> None:
    model = build_model(CLIP, PROMPTS, spec=spec, dino=RANDOM_DINO)
    if spec.backbone == "dino":
        model.set_class_embeddings(F.normalize(torch.randn(3, model.tower.embed_dim), dim=1))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, ["lizard", "hand", "background"], CLIP, 64)
    loaded, meta = load_checkpoint(path)
    assert ModelParams(**meta["model"]) == spec and meta["dino"]["model"] == DINO_TINY
    assert (
        type(loaded.tower) is type(model.tower) and loaded.freeze_backbone == spec.freeze_backbone
    )
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_old_checkpoints_without_a_backbone_load_as_clip(tmp_path: Path) -> None:
    model = build_model(CLIP, PROMPTS)
    path = tmp_path / "old.pt"
    save_checkpoint(path, model, ["lizard", "hand", "background"], CLIP, 64)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"], ckpt["dino"]
    torch.save(ckpt, path)
    loaded, _ = load_checkpoint(path)
    assert loaded.head is None and loaded.spec.resolved_head() == "text"


@pytest.mark.parametrize(
    ("model", "pretrained", "expected"),
    [
        ("vit_small_patch14_dinov2.lvd142m", "hub", "huggingface-cli download timm/vit_small_"),
        ("vit_base_patch16_dinov3.lvd1689m", "hub", "accept the DINOv3 licence"),
        ("vit_base_patch14_dinov2.lvd142m", "models/none.safetensors", "models/none.safetensors"),
        (DINO_TINY, "models/no_demo_dino.pt", "dvc repro demo_dino"),
    ],
)
def test_missing_dino_weights_are_one_line(
    model: str, pretrained: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as err:
        resolve_dino_weights(model, pretrained, allow_download=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_clip_weights_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = ClipParams(model="ViT-B-16", pretrained="laion2b_s34b_b88k")
    with pytest.raises(InputError) as err:
        build_model(clip, PROMPTS, spec=ModelParams(backbone="clip+dino", head="linear"))
    assert "huggingface-cli download" in str(err.value) and "\n" not in str(err.value)
