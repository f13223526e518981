"""SAM mask aggregation (METHOD.md "Model" 3-4): NU (exact, through the adjoint of bilinear
upsampling), PM (nearest-downsampled masks), the per-pixel baseline, and painting by winner index.

NU pools the bilinearly upsampled embedding over each mask. Upsampling is linear,
``up(E) = A_h · E · A_wᵀ`` per channel, so the mean over mask m is ``Σ W_m ⊙ E`` with
``W_m = A_hᵀ · mask_m · A_w / area_m`` on the low-resolution grid: the H×W×D map is never built.

Painting: masks come sorted by area, largest first, and are painted in that order, so the last
(smallest) mask covering a pixel wins. ``winner`` holds that mask's index per pixel, −1 where no
mask covers it; those pixels take the per-pixel prediction (upsampled embedding · text).

PM: a mask that vanishes when downsampled to the grid has no pooled vector. It is not painted
(left out of the winner index): its pixels show the next (larger) valid mask under it, or the
per-pixel prediction where there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VARIANTS = ("nu", "pm")
_CHUNK_PIXELS = 1 << 18  # mask pixels per chunk in the pooling: 1 MB of float32 stays in cache


def bilinear_matrix(
    n_out: int, n_in: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """1-D bilinear interpolation matrix (n_out, n_in): ``A @ x`` equals
    ``F.interpolate(x, size=n_out, mode="bilinear", align_corners=False)`` along that axis."""
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = src - i0.double()
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    mat.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    mat.index_put_((rows, i1), lam, accumulate=True)
    return mat.to(dtype=dtype, device=device)


def _as_bool_tensor(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if masks.dtype != torch.bool:
        masks = masks != 0
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {tuple(masks.shape)}")
    return masks


def nu_pool_weights(
    masks: torch.Tensor | np.ndarray, grid_hw: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """NU pooling weights on the embedding grid.

    masks: (M, H, W) bool → (M, h, w) ``dtype`` (default float32) with
    ``W_m = A_hᵀ · mask_m · A_w / area_m``, so ``Σ W_m ⊙ E`` is the mean over mask m of the
    bilinearly upsampled E. Rows of empty masks are 0.
    """
    masks = _as_bool_tensor(masks)
    m, height, width = masks.shape
    a_h = bilinear_matrix(height, grid_hw[0], dtype, masks.device)  # (H, h)
    a_w = bilinear_matrix(width, grid_hw[1], dtype, masks.device)  # (W, w)
    out = torch.empty(m, grid_hw[0], grid_hw[1], dtype=dtype, device=masks.device)
    area = torch.empty(m, dtype=dtype, device=masks.device)
    step = max(1, _CHUNK_PIXELS // max(1, height * width))
    for start in range(0, m, step):
        # via uint8: bool→float conversion and bool sums are several times slower
        rows = masks[start : start + step].view(torch.uint8).to(dtype) @ a_w  # (m, H, w)
        area[start : start + step] = rows.sum((1, 2))  # rows of A_w sum to 1: exact areas
        out[start : start + step] = a_h.T @ rows
    return out / area.clamp(min=1.0)[:, None, None]


def pool_weights_from_winner(
    winner: torch.Tensor, num_masks: int, grid_hw: tuple[int, int]
) -> torch.Tensor:
    """NU pool weights (M, h, w) float32 of *disjoint* masks given by their index map.

    winner: (H, W) int64, mask m = (winner == m), -1 = no mask. Equals
    ``nu_pool_weights(stack)`` of that stack (W_m = A_hᵀ · mask_m · A_w / area_m) with one pass
    over the pixels instead of M full-size masks: rows of A_w are summed per (mask, image row),
    then contracted with A_h.
    """
    height, width = winner.shape
    h, w = grid_hw
    a_h, a_w = bilinear_matrix(height, h), bilinear_matrix(width, w)
    ys, xs = torch.nonzero(winner >= 0, as_tuple=True)
    mask_id = winner[ys, xs]
    per_row = torch.zeros(num_masks * height, w).index_add_(0, mask_id * height + ys, a_w[xs])
    pooled = torch.einsum("myj,yi->mij", per_row.reshape(num_masks, height, w), a_h)
    area = torch.bincount(mask_id, minlength=num_masks).clamp(min=1).float()
    return pooled / area[:, None, None]


def pm_pool_weights(
    masks: torch.Tensor | np.ndarray, grid_hw: tuple[int, int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """PM pooling weights: masks downsampled to the grid by nearest neighbour (torch's
    ``mode="nearest"``, as the thesis's code would), normalised to sum 1.

    masks: (M, H, W) bool → weights (M, h, w) ``dtype`` (float32) and valid (M,) bool; a mask
    that vanishes on the grid is invalid and its row is 0.
    """
    masks = _as_bool_tensor(masks)
    if masks.shape[0] == 0:
        return torch.zeros(0, *grid_hw, dtype=dtype, device=masks.device), masks.new_zeros(0)
    down = F.interpolate(masks[:, None].to(torch.uint8), size=grid_hw, mode="nearest")[:, 0]
    down = down.to(dtype)
    count = down.flatten(1).sum(1)
    valid = count > 0
    return down / count.clamp(min=1.0)[:, None, None], valid


def winner_index(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Index of the mask that paints each pixel: the last (smallest) covering one.

    masks: (M, H, W) bool, sorted largest first → (H, W) int64, −1 where no mask covers the pixel.
    Painted in order, each mask writing only its own pixels; on the CPU through numpy into int16,
    several times faster than an argmax over the flipped uint8 stack (bench/aggregate.py).
    """
    masks = _as_bool_tensor(masks)
    if masks.device.type != "cpu":
        winner = torch.full(masks.shape[1:], -1, dtype=torch.int64, device=masks.device)
        for i, mask in enumerate(masks):
            winner.masked_fill_(mask, i)
        return winner
    small = masks.shape[0] <= np.iinfo(np.int16).max
    out = np.full(tuple(masks.shape[1:]), -1, np.int16 if small else np.int32)
    for i, mask in enumerate(masks.numpy()):
        out[mask] = i
    return torch.from_numpy(out).to(torch.int64)


@dataclass
class MaskInputs:
    """Per-image aggregation inputs.

    pool_weights: (M, h, w) float32; winner: (H, W) int64, −1 = per-pixel prediction.
    """

    pool_weights: torch.Tensor
    winner: torch.Tensor


def prepare_mask_inputs(
    masks: torch.Tensor | np.ndarray,
    grid_hw: tuple[int, int],
    variant: str = "nu",
    dtype: torch.dtype = torch.float32,
) -> MaskInputs:
    """Pool weights and winner index of one image's masks ((M, H, W) bool, largest first).

    ``variant`` "nu" (thesis NU, exact adjoint) or "pm" (nearest-downsampled masks; masks that
    vanish on the grid are not painted). ``dtype`` of the weights (float64 for exactness tests).
    """
    masks = _as_bool_tensor(masks)
    if variant == "nu":
        return MaskInputs(nu_pool_weights(masks, grid_hw, dtype), winner_index(masks))
    if variant == "pm":
        weights, valid = pm_pool_weights(masks, grid_hw, dtype)
        kept = torch.nonzero(valid).flatten()
        winner = winner_index(masks[kept])
        winner = torch.where(winner >= 0, kept[winner.clamp(min=0)], winner)
        return MaskInputs(weights, winner)
    raise ValueError(f"unknown aggregation variant {variant!r} (expected one of {VARIANTS})")


def collate_mask_inputs(items: list[MaskInputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image inputs: pool weights zero-padded to (B, Mmax, h, w), winners (B, H, W)."""
    m_max = max((it.pool_weights.shape[0] for it in items), default=0)
    weights = [
        F.pad(it.pool_weights, (0, 0, 0, 0, 0, m_max - it.pool_weights.shape[0])) for it in items
    ]
    return torch.stack(weights), torch.stack([it.winner for it in items])


def pixel_logits(
    emb: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Per-pixel logits (B, C, H, W): bilinear upsample of ``scale · emb · textᵀ`` on the grid,
    which equals the logits of the upsampled embedding (both maps are linear)."""
    low = logit_scale * torch.einsum("bdhw,cd->bchw", emb, text.to(emb.dtype))
    return F.interpolate(low, size=out_hw, mode="bilinear", align_corners=False)


def class_ids(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The index of the largest score along ``dim`` (int64; the first one on ties, NaN wins),
    equal to ``scores.argmax(dim)``.

    ``Tensor.max(dim).indices`` gives the same indices, and on the CPU it is about 18x faster
    than ``argmax`` over the class axis of a (B, C, H, W) map (11 ms vs 200 ms for 15 x 4 x 256²
    in torch 2.14), whose cost was 28 of the evaluate stage's 120 s.
    """
    return scores.max(dim=dim).indices


def aggregate_log_probs(
    emb: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    pool_weights: torch.Tensor | None,
    winner: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Class log-probabilities (B, C, H, W) float, differentiable w.r.t. ``emb``.

    emb: (B, D, h, w) float, L2-normalised per location; text: (C, D) L2-normalised;
    pool_weights: (B, M, h, w) float32 (zero rows = padding or empty masks) or None;
    winner: (B, H, W) int64, −1 = no mask, or None. Pooled vectors ``Σ W ⊙ emb`` are
    re-normalised, classified with ``scale · pooled · textᵀ``, and painted on pixels whose
    winner ≥ 0; the other pixels take the per-pixel log-softmax. None → per-pixel baseline only.
    """
    if (pool_weights is None) != (winner is None):
        raise ValueError("pool_weights and winner must both be given or both be None")
    pix = F.log_softmax(pixel_logits(emb, text, logit_scale, out_hw), dim=1)
    if pool_weights is None or winner is None or pool_weights.shape[1] == 0:
        return pix
    pooled = torch.einsum("bmhw,bdhw->bmd", pool_weights.to(emb.dtype), emb)
    pooled = F.normalize(pooled, dim=-1)
    mask_logp = F.log_softmax(logit_scale * pooled @ text.to(emb.dtype).T, dim=-1)  # (B, M, C)
    b, c = pix.shape[:2]
    index = winner.clamp(min=0).reshape(b, 1, -1).expand(b, c, -1)
    painted = torch.gather(mask_logp.transpose(1, 2), 2, index).reshape(pix.shape)
    return torch.where((winner >= 0)[:, None], painted, pix)


def aggregate_log_probs_naive(
    emb: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    masks: list[torch.Tensor] | None,
    out_hw: tuple[int, int],
    variant: str = "nu",
) -> torch.Tensor:
    """Reference aggregation, literally as the thesis describes it (for tests and the bench).

    NU: upsample emb to H×W, masked mean per mask (one matmul), re-normalise, classify, paint
    the masks one by one, largest first. PM: masked mean of the low-res emb over the
    nearest-downsampled mask; vanished masks are skipped. masks: per image a (M, H, W) bool
    tensor, or None (per-pixel baseline). Returns (B, C, H, W) log-probabilities.
    """
    up = F.interpolate(emb, size=out_hw, mode="bilinear", align_corners=False)
    text = text.to(emb.dtype)
    out = F.log_softmax(logit_scale * torch.einsum("bdhw,cd->bchw", up, text), dim=1)
    if masks is None:
        return out
    rows = []
    for i, image_masks in enumerate(masks):
        if variant == "nu":
            sel, feats = image_masks.to(emb.dtype), up[i]
        else:
            sel = F.interpolate(image_masks[:, None].to(emb.dtype), emb.shape[-2:], mode="nearest")
            sel, feats = sel[:, 0], emb[i]
        area = sel.flatten(1).sum(1)
        pooled = sel.flatten(1) @ feats.flatten(1).T / area.clamp(min=1.0)[:, None]  # (M, D)
        logp = F.log_softmax(logit_scale * F.normalize(pooled, dim=1) @ text.T, dim=1)
        img = out[i]
        for mask, dist, n in zip(image_masks, logp, area.tolist(), strict=True):
            if n > 0:  # an empty (or, in PM, vanished) mask paints nothing
                img = torch.where(mask[None], dist[:, None, None], img)
        rows.append(img)
    return torch.stack(rows)


Classifier = Callable[[torch.Tensor], torch.Tensor]


def aggregate_head_log_probs(
    emb: torch.Tensor,
    classify: Classifier,
    pool_weights: torch.Tensor | None,
    winner: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """:func:`aggregate_log_probs` with a trained head: ``classify`` maps (..., D) embeddings to
    (..., C) logits (a linear or MLP head). Regions: the re-normalised NU-pooled embedding is
    classified. Uncovered pixels: the head's logits on the grid, upsampled bilinearly; for a
    linear head these equal the logits of the upsampled embedding (bilinear weights sum to 1),
    for an MLP they are its bilinear interpolation (the H×W×D map is never built)."""
    if (pool_weights is None) != (winner is None):
        raise ValueError("pool_weights and winner must both be given or both be None")
    low = classify(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    pix = F.log_softmax(F.interpolate(low, size=out_hw, mode="bilinear", align_corners=False), 1)
    if pool_weights is None or winner is None or pool_weights.shape[1] == 0:
        return pix
    pooled = F.normalize(torch.einsum("bmhw,bdhw->bmd", pool_weights.to(emb.dtype), emb), dim=-1)
    mask_logp = F.log_softmax(classify(pooled), dim=-1)  # (B, M, C)
    b, c = pix.shape[:2]
    index = winner.clamp(min=0).reshape(b, 1, -1).expand(b, c, -1)
    painted = torch.gather(mask_logp.transpose(1, 2), 2, index).reshape(pix.shape)
    return torch.where((winner >= 0)[:, None], painted, pix)
