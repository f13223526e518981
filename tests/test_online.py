"""Online self-training pieces: EMA update, confidence masking, CutMix alignment, complementary
channels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from opensam.config import ClipParams
from opensam.data.cutmix import StrongConfig, cutmix_batch, mix_winner, photometric, sample_box
from opensam.model.aggregation import nu_pool_weights, pool_weights_from_winner, winner_index
from opensam.model.segmenter import build_model, embedding_channels
from opensam.train.engine import TrainConfig
from opensam.train.online import (
    OnlineConfig,
    complementary_channels,
    confident_loss,
    ema_decay_at,
    ema_update,
)


def test_ema_update_moves_teacher_towards_student() -> None:
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, before, s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s)
    ema_update(teacher, student, 0.0)  # decay 0: a copy
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def test_ema_decay_warms_up_then_caps() -> None:
    assert ema_decay_at(0, 0.99) == 0.5
    assert ema_decay_at(8, 0.99) == 0.9
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_confident_loss_ignores_unconfident_pixels() -> None:
    logp = torch.log_softmax(torch.randn(2, 3, 4, 4), dim=1)
    label = torch.randint(0, 3, (2, 4, 4))
    conf = torch.rand(2, 4, 4)
    loss, frac = confident_loss(logp, label, conf, 0.5)
    keep = conf >= 0.5
    picked = -logp.gather(1, label[:, None])[:, 0]
    torch.testing.assert_close(loss, (picked * keep).sum() / label.numel())
    assert frac == float(keep.float().mean())
    # changing the labels of unconfident pixels changes nothing
    other = torch.where(keep, label, (label + 1) % 3)
    torch.testing.assert_close(confident_loss(logp, other, conf, 0.5)[0], loss)
    none, zero = confident_loss(logp, label, torch.zeros(2, 4, 4), 0.5)
    assert float(none) == 0.0 and zero == 0.0


def _disjoint_stack(rng: np.random.Generator, m: int, size: int) -> torch.Tensor:
    """m disjoint masks (largest first) covering a random part of a size×size image."""
    owner = torch.from_numpy(rng.integers(-1, m, (size, size)))
    stack = torch.stack([owner == i for i in range(m)])
    order = torch.argsort(stack.flatten(1).sum(1), descending=True, stable=True)
    return stack[order]


def test_cutmix_masks_line_up_with_the_mixed_pseudo_label() -> None:
    rng = np.random.default_rng(0)
    size, m, grid = 16, 5, (4, 4)
    stacks = [_disjoint_stack(rng, m, size) for _ in range(2)]
    winners = torch.stack([winner_index(s) for s in stacks])
    pools = torch.stack([nu_pool_weights(s, grid) for s in stacks])
    labels = torch.randint(0, 4, (2, size, size))
    conf = torch.rand(2, size, size)
    image = torch.rand(2, 3, size, size)
    box = torch.zeros(2, size, size, dtype=torch.bool)
    box[0, 3:11, 5:13] = True
    mixed = cutmix_batch(image, winners, pools, labels, conf, box, torch.tensor([1, 0]))
    # the mixed image, labels and confidences come from the partner inside the box only
    inside = box[0]
    torch.testing.assert_close(mixed.image[0][:, inside], image[1][:, inside])
    torch.testing.assert_close(mixed.image[0][:, ~inside], image[0][:, ~inside])
    assert torch.equal(mixed.label[0][inside], labels[1][inside])
    assert torch.equal(mixed.label[0][~inside], labels[0][~inside])
    assert torch.equal(mixed.conf[0], torch.where(inside, conf[1], conf[0]))
    # the explicit mixed stack: own masks outside the box, the partner's inside
    stack = torch.cat([stacks[0] & ~inside, stacks[1] & inside])
    assert torch.equal(mixed.winner[0], winner_index(stack))
    torch.testing.assert_close(mixed.pool_weights[0], nu_pool_weights(stack, grid))
    # every mixed mask lies in one source, and its pixels carry that source's pseudo-label
    for i, mask in enumerate(stack):
        if mask.any():
            src = 1 if i >= m else 0
            assert bool((inside[mask] == bool(src)).all())
            assert torch.equal(mixed.label[0][mask], labels[src][mask])
    # no box: the item is unchanged
    assert torch.equal(mixed.winner[1], winners[1])
    assert torch.equal(mixed.image[1], image[1])


def test_mix_winner_keeps_uncovered_pixels() -> None:
    a = torch.tensor([[0, -1], [1, 1]])
    b = torch.tensor([[-1, 0], [2, -1]])
    box = torch.tensor([[True, True], [False, True]])
    assert mix_winner(a, b, box, 3).tolist() == [[-1, 3], [1, -1]]
    w = mix_winner(a, b, box, 3)
    pool = pool_weights_from_winner(w, 6, (2, 2))
    assert pool.shape == (6, 2, 2)
    torch.testing.assert_close(pool.sum((1, 2)), torch.tensor([0.0, 1, 0, 1, 0, 0]))


def test_strong_views_are_seeded_and_in_range() -> None:
    image = torch.rand(3, 32, 32)
    cfg = StrongConfig(jitter_prob=1.0, gray_prob=0.5, blur_prob=1.0, cutmix_prob=1.0)
    a = photometric(image, cfg, np.random.default_rng(3))
    b = photometric(image, cfg, np.random.default_rng(3))
    assert torch.equal(a, b) and not torch.equal(a, image)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    box = sample_box(32, 32, cfg, np.random.default_rng(1))
    assert box.any() and torch.equal(box, sample_box(32, 32, cfg, np.random.default_rng(1)))
    never = StrongConfig(cutmix_prob=0.0)
    assert not sample_box(32, 32, never, np.random.default_rng(1)).any()


def test_complementary_channels_give_each_channel_to_one_view() -> None:
    train = TrainConfig(epochs=1, lr_max=1e-3, lr_min=1e-5, weight_decay=0.0, batch_size=2)
    cfg = OnlineConfig(train=train, feature_dropout=0.5)
    keep = complementary_channels(64, 256, cfg, np.random.default_rng(0))
    assert keep.shape == (64, 256) and set(keep.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(keep + (1 - keep), torch.ones(64, 256))  # the second view: the rest
    assert 0.45 < float(keep.mean()) < 0.55
    rarer = replace(cfg, feature_dropout=0.8)
    fewer = complementary_channels(64, 256, rarer, np.random.default_rng(0))
    assert 0.15 < float(fewer.mean()) < 0.25  # kept with probability 1 - feature_dropout


def test_channel_mask_zeroes_the_dropped_channels_of_the_embedding() -> None:
    torch.manual_seed(0)
    model = build_model(ClipParams(model="opensam-tiny", pretrained=None), ["a", "b"])
    images = torch.rand(2, 3, 64, 64)
    dim = embedding_channels(model)
    mask = torch.ones(2, dim)
    mask[:, : dim // 2] = 0
    with torch.no_grad():
        full, masked = model.embed(images), model.embed(images, channel_mask=mask)
        assert torch.allclose(model.embed(images, channel_mask=torch.ones(2, dim)), full)
    assert torch.all(masked[:, : dim // 2] == 0)
    kept = torch.nn.functional.normalize(full[:, dim // 2 :], dim=1)  # renormalised
    assert torch.allclose(masked[:, dim // 2 :], kept, atol=1e-5)
