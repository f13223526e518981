"""OpenSamModel: shapes, normalisation, aggregation wiring, decoders and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opensam.config import ClipParams
from opensam.errors import InputError
from opensam.model.aggregation import aggregate_log_probs, collate_mask_inputs, prepare_mask_inputs
from opensam.model.clip import create_clip
from opensam.model.segmenter import (
    DECODERS,
    OpenSamModel,
    build_model,
    checkpoint_clip,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)

CLASSES = ["lizard", "hand", "color board", "background"]
PROMPTS = ["a lizard", "a human hand", "a color board", "a background"]


@pytest.fixture(scope="module")
def model() -> OpenSamModel:
    torch.manual_seed(0)
    return build_model(ClipParams(pretrained=None), PROMPTS)


def masks_for(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(3, size, size, generator=gen) < torch.tensor([0.6, 0.3, 0.1])[:, None, None]
    return masks


def test_shapes_normalisation_and_log_probs(model: OpenSamModel) -> None:
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        emb = model.embed(images)
        logp = model(images)
    assert model.grid_hw(256) == (8, 8) and model.grid_hw(64) == (2, 2)
    assert emb.shape == (2, 128, 2, 2)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2, 2, 2), atol=1e-5)
    assert logp.shape == (2, 4, 64, 64)
    assert torch.allclose(logp.exp().sum(1), torch.ones(2, 64, 64), atol=1e-5)
    assert model.text_embeddings.shape == (4, 128)
    assert float(model.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)


def test_embed_applies_the_clip_normalisation(model: OpenSamModel) -> None:
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        manual = model.tower((images - model.mean) / model.std)
        assert torch.allclose(model.embed(images), torch.nn.functional.normalize(manual, dim=1))
    assert model.mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_forward_with_masks_is_the_aggregation_of_the_embedding(model: OpenSamModel) -> None:
    images = torch.rand(2, 3, 64, 64)
    inputs = [prepare_mask_inputs(masks_for(64, s), model.grid_hw(64)) for s in (1, 2)]
    pool, winner = collate_mask_inputs(inputs)
    with torch.no_grad():
        out = model(images, pool, winner)
        ref = aggregate_log_probs(
            model.embed(images), model.text_embeddings, model.logit_scale, pool, winner, (64, 64)
        )
        pred = model.predict_embedding(model.embed(images)[1], (64, 64), masks_for(64, 2))
    assert torch.equal(out, ref)
    assert torch.equal(pred, out[1].argmax(0))
    assert not torch.equal(out, model(images))  # masks change the prediction


def test_gradients_reach_the_tower_but_not_the_text(model: OpenSamModel) -> None:
    model.train()
    try:
        inputs = [prepare_mask_inputs(masks_for(64, 3), model.grid_hw(64))]
        pool, winner = collate_mask_inputs(inputs)
        model(torch.rand(1, 3, 64, 64), pool, winner).mean().backward()
        grads = [p.grad for p in model.tower.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        assert not model.text_embeddings.requires_grad
        assert "text_embeddings" not in dict(model.named_parameters())
    finally:
        model.zero_grad()
        model.eval()


def test_checkpoint_round_trip(model: OpenSamModel, tmp_path: Path) -> None:
    path = tmp_path / "models" / "teacher.pt"
    save_checkpoint(path, model, CLASSES, ClipParams(pretrained=None), 64, epoch=3, val_miou=41.5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher.pt"]  # no temporary left
    loaded, meta = load_checkpoint(path, expected_classes=CLASSES, drop_path=0.1)
    assert meta["classes"] == CLASSES and meta["image_size"] == 64
    assert meta["epoch"] == 3 and meta["val_miou"] == 41.5
    assert meta["clip"]["model"] == "opensam-tiny" and "state_dict" not in meta
    assert torch.equal(meta["text_embeddings"], model.text_embeddings)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert not loaded.training


def test_a_checkpoint_is_the_same_bytes_in_every_run(
    model: OpenSamModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs (two PIDs, so two temporary names) saving the same weights write the same file,
    so DVC sees the same hash and reruns nothing downstream."""
    files = []
    for pid, run in ((4242, "a"), (5353, "b")):
        monkeypatch.setattr("opensam.runtime.os.getpid", lambda pid=pid: pid)
        path = tmp_path / run / "teacher.pt"
        save_checkpoint(
            path, model, CLASSES, ClipParams(pretrained=None), 64, epoch=3, val_miou=41.5
        )
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_checkpoint_errors(model: OpenSamModel, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, CLASSES, ClipParams(pretrained=None), 64)
    with pytest.raises(InputError) as err:
        load_checkpoint(path, expected_classes=["cat", "dog"])
    assert str(err.value).startswith(f"{path}: ") and "cat" in str(err.value)
    assert "lizard" in str(err.value) and "params.yaml" in str(err.value)
    with pytest.raises(InputError, match="differ from my.yaml classes"):
        load_checkpoint(path, ["cat", "dog"], classes_from="my.yaml classes")
    meta = read_checkpoint_meta(path)
    assert "state_dict" not in meta and meta["classes"] == CLASSES and meta["image_size"] == 64
    assert checkpoint_clip(meta, path) == ClipParams(pretrained=None)
    with pytest.raises(InputError, match=f"^{path}: bad 'clip' entry"):
        checkpoint_clip({**meta, "clip": {"bogus": 1}}, path)
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(InputError, match="not an OpenSAM checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")


def test_unknown_decoder_is_an_input_error() -> None:
    assert "upsample" in DECODERS
    with pytest.raises(InputError, match="clip.decoder"):
        build_model(ClipParams(pretrained=None, decoder="unet"), PROMPTS)


@pytest.mark.slow
def test_convnext_base_w_weights_from_a_user_file(tmp_path: Path) -> None:
    """The thesis architecture with random weights, saved to a file and loaded back through
    clip.pretrained = path (the code path a user's downloaded weights take)."""
    torch.manual_seed(0)
    clip = create_clip("convnext_base_w", None)
    path = tmp_path / "convnext_base_w.bin"
    torch.save(clip.state_dict(), path)
    expected = clip.visual.head.proj.weight.detach().clone()
    del clip
    model = build_model(ClipParams(model="convnext_base_w", pretrained=str(path)), PROMPTS)
    assert torch.equal(model.tower.proj_head.proj.weight, expected)
    with torch.no_grad():
        emb = model.embed(torch.rand(1, 3, 64, 64))
    assert emb.shape == (1, 640, 2, 2)
    assert model.text_embeddings.shape == (4, 640)
