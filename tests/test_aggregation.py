"""NU through the adjoint equals the naive upsample-pool-paint; winner index; PM behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensam.model.aggregation import (
    aggregate_log_probs,
    aggregate_log_probs_naive,
    bilinear_matrix,
    class_ids,
    collate_mask_inputs,
    nu_pool_weights,
    pixel_logits,
    pm_pool_weights,
    prepare_mask_inputs,
    winner_index,
)


def random_masks(gen: torch.Generator, m: int, h: int, w: int) -> torch.Tensor:
    """(m, h, w) bool: random rectangles (some empty, some overlapping), sorted largest first."""
    masks = torch.zeros(m, h, w, dtype=torch.bool)
    for i in range(m):
        y0, x0 = (int(torch.randint(0, s, (1,), generator=gen)) for s in (h, w))
        y1 = y0 + int(torch.randint(0, h - y0 + 1, (1,), generator=gen))
        x1 = x0 + int(torch.randint(0, w - x0 + 1, (1,), generator=gen))
        masks[i, y0:y1, x0:x1] = True
    order = masks.flatten(1).sum(1).argsort(descending=True, stable=True)
    return masks[order]


def random_case(
    seed: int, b: int, d: int, grid: tuple[int, int], m: int, out: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, *grid, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(4, d, generator=gen, dtype=torch.float64), dim=1)
    masks = [random_masks(gen, m if i == 0 else max(0, m - 2 * i), *out) for i in range(b)]
    return emb, text, masks


@pytest.mark.parametrize(("n_out", "n_in"), [(256, 8), (64, 2), (37, 5), (5, 1), (9, 9), (4, 11)])
def test_bilinear_matrix_equals_interpolate(n_out: int, n_in: int) -> None:
    x = torch.randn(1, 3, n_in, 6, dtype=torch.float64)
    ref = F.interpolate(x, size=(n_out, 6), mode="bilinear", align_corners=False)
    mat = bilinear_matrix(n_out, n_in, dtype=torch.float64)
    assert torch.allclose(torch.einsum("oi,bciw->bcow", mat, x), ref, atol=1e-12)


@pytest.mark.parametrize(
    ("b", "d", "grid", "m", "out"),
    [
        (1, 8, (2, 2), 5, (64, 64)),
        (2, 8, (2, 3), 2, (20, 30)),  # the second image has no masks
        (2, 16, (4, 5), 7, (37, 45)),
        (1, 640, (8, 8), 12, (64, 48)),
    ],
)
def test_nu_fast_equals_naive_forward_and_gradient(
    b: int, d: int, grid: tuple[int, int], m: int, out: tuple[int, int]
) -> None:
    emb, text, masks = random_case(b * 100 + m, b, d, grid, m, out)
    upstream = torch.randn(b, 4, *out, generator=torch.Generator().manual_seed(1))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        inputs = [prepare_mask_inputs(mk, grid, dtype=dtype) for mk in masks]
        weights, winner = collate_mask_inputs(inputs)
        fast_in = emb.to(dtype).requires_grad_()
        naive_in = emb.to(dtype).requires_grad_()
        fast = aggregate_log_probs(fast_in, text.to(dtype), 20.0, weights, winner, out)
        naive = aggregate_log_probs_naive(naive_in, text.to(dtype), 20.0, masks, out)
        assert (fast - naive).abs().max() <= 1e-5
        (g_fast,) = torch.autograd.grad((fast * upstream.to(dtype)).sum(), fast_in)
        (g_naive,) = torch.autograd.grad((naive * upstream.to(dtype)).sum(), naive_in)
        grads[dtype] = (g_fast, g_naive)
    g_fast, g_naive = grads[torch.float64]  # summed over H×W pixels: |g| up to ~300
    assert g_fast.abs().max() > 1e-3
    assert (g_fast - g_naive).abs().max() <= 1e-5
    g_fast, g_naive = grads[torch.float32]
    assert (g_fast - g_naive).abs().max() <= 1e-5 * g_naive.abs().max()


def test_nu_weights_give_the_mean_of_the_upsampled_map() -> None:
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    masks = random_masks(gen, 6, 40, 52)
    up = F.interpolate(emb[None], size=(40, 52), mode="bilinear", align_corners=False)[0]
    weights = nu_pool_weights(masks, (3, 4)).double()
    for mask, w in zip(masks, weights, strict=True):
        if mask.any():
            expected = up[:, mask].mean(1)
            assert torch.allclose((w * emb).sum((1, 2)), expected, atol=1e-6)
            assert abs(float(w.sum()) - 1.0) < 1e-6
        else:
            assert not w.any()


def test_winner_is_the_last_covering_mask() -> None:
    masks = random_masks(torch.Generator().manual_seed(5), 9, 30, 20)
    expected = torch.full((30, 20), -1, dtype=torch.int64)
    for i, mask in enumerate(masks):  # paint in order: a later mask overwrites
        expected[mask] = i
    assert torch.equal(winner_index(masks), expected)
    assert torch.equal(winner_index(masks.numpy()), expected)
    assert (winner_index(torch.zeros(0, 4, 3, dtype=torch.bool)) == -1).all()


def two_class_setup() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2×2 grid whose left column is class 0 and right column class 1 (D = 2)."""
    emb = torch.zeros(1, 2, 2, 2)
    emb[0, 0, :, 0] = 1.0
    emb[0, 1, :, 1] = 1.0
    return emb, torch.eye(2)


def test_smaller_mask_wins_and_uncovered_pixels_get_the_per_pixel_prediction() -> None:
    emb, text = two_class_setup()
    large = torch.zeros(16, 16, dtype=torch.bool)
    large[:, :12] = True  # mostly the left (class 0) half
    small = torch.zeros(16, 16, dtype=torch.bool)
    small[4:12, 9:12] = True  # right part: class 1, inside the large mask
    inputs = prepare_mask_inputs(torch.stack([large, small]), (2, 2))
    logp = aggregate_log_probs(
        emb, text, 10.0, inputs.pool_weights[None], inputs.winner[None], (16, 16)
    )
    pred = logp[0].argmax(0)
    assert (pred[small] == 1).all()
    assert (pred[large & ~small] == 0).all()
    uncovered = ~large
    baseline = F.log_softmax(pixel_logits(emb, text, 10.0, (16, 16)), dim=1)
    assert torch.equal(logp[0][:, uncovered], baseline[0][:, uncovered])
    assert (pred[uncovered] == 1).all()
    rest = logp[0][:, large & ~small]  # one distribution for the whole mask
    assert torch.equal(rest, rest[:, :1].expand_as(rest))


def test_without_masks_is_the_per_pixel_baseline() -> None:
    emb, text, _ = random_case(0, 2, 8, (3, 3), 0, (24, 24))
    out = aggregate_log_probs(emb, text, 5.0, None, None, (24, 24))
    ref = aggregate_log_probs_naive(emb, text, 5.0, None, (24, 24))
    assert torch.allclose(out, ref, atol=1e-10)
    with pytest.raises(ValueError):
        aggregate_log_probs(emb, text, 5.0, torch.zeros(2, 0, 3, 3), None, (24, 24))


def test_pm_weights_are_nearest_downsampled_and_normalised() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0:4, 0:8] = True  # nearest (rows/cols 0 and 4) keeps the top row of the 2×2 grid
    weights, valid = pm_pool_weights(mask, (2, 2))
    assert valid.tolist() == [True]
    assert torch.allclose(weights[0], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))


def test_pm_vanished_mask_is_not_painted() -> None:
    emb, text = two_class_setup()
    large = torch.zeros(16, 16, dtype=torch.bool)
    large[:, :12] = True
    tiny = torch.zeros(16, 16, dtype=torch.bool)
    tiny[5:7, 10:12] = True  # misses the nearest samples (rows/cols 0 and 8): vanishes
    lone = torch.zeros(16, 16, dtype=torch.bool)
    lone[13:15, 13:15] = True  # vanishes too, and lies outside every other mask
    masks = torch.stack([large, tiny, lone])
    inputs = prepare_mask_inputs(masks, (2, 2), variant="pm")
    assert not inputs.pool_weights[1:].any()
    assert (inputs.winner[tiny] == 0).all() and (inputs.winner[lone] == -1).all()
    logp = aggregate_log_probs(
        emb, text, 10.0, inputs.pool_weights[None], inputs.winner[None], (16, 16)
    )
    naive = aggregate_log_probs_naive(emb, text, 10.0, [masks], (16, 16), variant="pm")
    assert (logp - naive).abs().max() <= 1e-5
    baseline = F.log_softmax(pixel_logits(emb, text, 10.0, (16, 16)), dim=1)
    assert torch.equal(logp[0][:, lone], baseline[0][:, lone])
    large_dist = logp[0][:, large & ~tiny][:, :1]
    assert torch.equal(logp[0][:, tiny], large_dist.expand(2, int(tiny.sum())))


def test_prepare_accepts_numpy_and_collate_pads_with_zero_rows() -> None:
    gen = torch.Generator().manual_seed(7)
    a = prepare_mask_inputs(random_masks(gen, 3, 32, 32).numpy(), (1, 1))
    b = prepare_mask_inputs(np.zeros((0, 32, 32), bool), (1, 1))
    weights, winner = collate_mask_inputs([a, b])
    assert weights.shape == (2, 3, 1, 1) and weights.dtype == torch.float32
    assert not weights[1].any() and (winner[1] == -1).all()
    with pytest.raises(ValueError):
        prepare_mask_inputs(np.zeros((1, 8, 8), bool), (1, 1), variant="xx")


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_class_ids_equal_argmax_with_ties_and_nan(dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (3, 4, 5, 6), generator=gen).float()  # many ties
    scores[0, :, 0, 0] = float("nan")
    scores[1, 2, 1, 1] = float("nan")
    assert torch.equal(class_ids(scores, dim), scores.argmax(dim))
    assert class_ids(scores, dim).dtype == torch.int64
