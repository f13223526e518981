"""OpenCLIP loading offline, the tiny config, dense image embeddings and prompt embeddings."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from timm.layers import DropPath

from opensam.errors import InputError
from opensam.model.clip import (
    TINY_MODEL,
    DenseImageTower,
    create_clip,
    encode_prompts,
    get_tokenizer,
    resolve_pretrained,
)

BASE_REPO = "laion/CLIP-convnext_base_w-laion2B-s13B-b82K"


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_clip(TINY_MODEL, None)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_tiny_config_is_registered(tiny: torch.nn.Module) -> None:
    assert TINY_MODEL in open_clip.list_models()
    assert type(tiny.visual.trunk).__name__ == "ConvNeXt"
    assert tiny.text_projection.shape[1] == 128
    assert tiny.context_length == 16


def test_dense_map_shape_and_stride(tiny: torch.nn.Module) -> None:
    tower = DenseImageTower(tiny.visual).eval()
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 96, 64))
    assert out.shape == (2, 128, 3, 2)
    assert tower.grid_hw((96, 64)) == (3, 2)
    assert tower.embed_dim == 128


def test_dense_map_on_a_1x1_grid_equals_the_pooled_image_embedding(tiny: torch.nn.Module) -> None:
    """With one location, pooling is the identity, so the dense path must be exactly
    open_clip's encode_image (norm and projection included)."""
    tower = DenseImageTower(tiny.visual).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = tower(x)
        pooled = tiny.encode_image(x)
    assert dense.shape == (3, 128, 1, 1)
    assert torch.allclose(dense[:, :, 0, 0], pooled, atol=1e-5)


def test_dense_map_average_is_projection_of_mean_normalised_features(
    tiny: torch.nn.Module,
) -> None:
    """The projection is linear, so mean_xy(dense) = proj(mean_xy(LN(features))) exactly. The
    model's own pooled path is proj(LN(mean_xy(features))): LayerNorm does not commute with the
    average, so that one differs (documented in DenseImageTower)."""
    tower = DenseImageTower(tiny.visual).eval()
    trunk, proj = tiny.visual.trunk, tiny.visual.head.proj
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        dense_mean = tower(x).mean((2, 3))
        feats = trunk.forward_features(x)
        ln_then_mean = proj(trunk.head.norm(feats).mean((2, 3)))
        mean_then_ln = tiny.encode_image(x)
    assert torch.allclose(dense_mean, ln_then_mean, atol=1e-5)
    assert not torch.allclose(dense_mean, mean_then_ln, atol=1e-3)


def test_encode_prompts_is_normalised_and_templates_change_it(tiny: torch.nn.Module) -> None:
    tok = get_tokenizer(TINY_MODEL)
    prompts = ["a lizard", "a human hand", "a color board"]
    plain = encode_prompts(tiny, tok, prompts, templates=False)
    templ = encode_prompts(tiny, tok, prompts, templates=True)
    assert plain.shape == templ.shape == (3, 128) and plain.dtype == torch.float32
    assert torch.allclose(plain.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(templ.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(plain, templ, atol=1e-3)
    direct = tiny.encode_text(tok(["a lizard"]), normalize=True)[0]
    assert torch.allclose(plain[0], direct, atol=1e-5)


def test_missing_tag_weights_fail_fast_naming_the_hub_file(empty_hf_cache: Path) -> None:
    with pytest.raises(InputError) as err:
        create_clip("convnext_base_w", "laion2b_s13b_b82k", allow_download=False)
    msg = str(err.value)
    assert msg.startswith(f"hf-hub:{BASE_REPO}/")
    assert "huggingface-cli download" in msg and "clip.pretrained" in msg
    assert "\n" not in msg


def test_tag_resolves_from_the_local_hf_cache(empty_hf_cache: Path) -> None:
    repo = empty_hf_cache / f"models--{BASE_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"not really weights")
    path = resolve_pretrained("convnext_base_w", "laion2b_s13b_b82k", allow_download=False)
    assert Path(path) == weights


def test_unknown_tag_or_missing_file(empty_hf_cache: Path) -> None:
    with pytest.raises(InputError, match="not a file and not an open_clip tag"):
        create_clip(TINY_MODEL, "models/nowhere.bin")
    with pytest.raises(InputError, match="unknown open_clip model"):
        create_clip("no-such-model", None)


def test_weights_from_a_file_path_and_bad_files(tiny: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded = create_clip(TINY_MODEL, str(path))
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match=f"^{bad}: cannot load as {TINY_MODEL} weights"):
        create_clip(TINY_MODEL, str(bad))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(2)}, wrong)
    with pytest.raises(InputError, match=f"^{wrong}: "):
        create_clip(TINY_MODEL, str(wrong))


def test_drop_path_reaches_the_trunk() -> None:
    model = create_clip(TINY_MODEL, None, drop_path=0.2)
    rates = [m.drop_prob for m in model.visual.trunk.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    plain = create_clip(TINY_MODEL, None)
    assert not any(isinstance(m, DropPath) for m in plain.visual.trunk.modules())
