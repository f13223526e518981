"""Strong views of unlabelled batches: photometric noise and CutMix that keeps masks valid.

CutMix pastes a box of a partner image into an image. The mixed image's regions are the masks of
both sources, each cut to the part it shows: outside the box the image's own masks, inside it
the partner's, with the partner's mask ids shifted by ``M`` (the padded mask count), so the two
sets never collide. The winner map is mixed the same way and the NU pool weights are rebuilt
from it (:func:`opensam.model.aggregation.pool_weights_from_winner`), so region pooling in the
mixed image never averages across the seam. For disjoint masks (superpixels) this equals NU
pooling of the mixed stack ``[masks_a & ~box, masks_b & box]`` exactly; for overlapping masks
(SAM) each mask pools over the part of it that it paints. Pseudo-labels and confidences are
mixed with the same box, so labels, masks and pixels line up.

The photometric part uses ``torchvision.transforms.v2.functional`` ops (colour jitter,
grayscale, Gaussian blur). All randomness comes from a ``numpy.random.Generator`` the caller
passes (the online loop seeds one per step, so a resumed run draws the same views).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from opensam.model.aggregation import pool_weights_from_winner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrongConfig:
    """Strong-view strengths (UniMatch's defaults): jitter applied with ``jitter_prob``
    (brightness / contrast / saturation factors 1 ± value, hue shift in turns), grayscale with
    ``gray_prob``, Gaussian blur (sigma range in pixels) with ``blur_prob``; CutMix with
    ``cutmix_prob``, box area a fraction in ``cutmix_area`` of the image, aspect in
    ``cutmix_aspect`` (log-uniform)."""

    jitter_prob: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_prob: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)


def photometric(image: torch.Tensor, cfg: StrongConfig, rng: np.random.Generator) -> torch.Tensor:
    """Strong photometric noise of one image (3, H, W) float32 in [0, 1]; the same shape."""
    draws = rng.uniform(size=8)
    out = image
    if draws[0] < cfg.jitter_prob:
        out = TF.adjust_brightness(out, 1 + cfg.brightness * (2 * draws[1] - 1))
        out = TF.adjust_contrast(out, 1 + cfg.contrast * (2 * draws[2] - 1))
        out = TF.adjust_saturation(out, 1 + cfg.saturation * (2 * draws[3] - 1))
        out = TF.adjust_hue(out, cfg.hue * (2 * draws[4] - 1))
    if draws[5] < cfg.gray_prob:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if draws[6] < cfg.blur_prob:
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * draws[7]
        radius = max(1, min(int(math.ceil(3 * sigma)), (min(out.shape[-2:]) - 1) // 2))
        out = TF.gaussian_blur(out, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    return out.clamp(0.0, 1.0).contiguous()


def sample_box(
    height: int, width: int, cfg: StrongConfig, rng: np.random.Generator
) -> torch.Tensor:
    """A CutMix box as an (H, W) bool mask; all False when CutMix is not drawn (``cutmix_prob``)."""
    box = torch.zeros(height, width, dtype=torch.bool)
    draws = rng.uniform(size=5)
    if draws[0] >= cfg.cutmix_prob:
        return box
    lo_a, hi_a = cfg.cutmix_area
    area = height * width * (lo_a + (hi_a - lo_a) * draws[1])
    lo, hi = math.log(cfg.cutmix_aspect[0]), math.log(cfg.cutmix_aspect[1])
    aspect = math.exp(lo + (hi - lo) * draws[2])
    bh = max(1, min(height, int(round(math.sqrt(area / aspect)))))
    bw = max(1, min(width, int(round(math.sqrt(area * aspect)))))
    y0 = int(draws[3] * (height - bh + 1))
    x0 = int(draws[4] * (width - bw + 1))
    box[y0 : y0 + bh, x0 : x0 + bw] = True
    return box


@dataclass
class MixedBatch:
    """A CutMixed batch: image (B, 3, H, W), winner (B, H, W) int64 (ids of partner masks
    shifted by M), pool_weights (B, 2M, h, w), label (B, H, W) int64 and conf (B, H, W) float,
    box (B, H, W) bool (True = from the partner ``partner[b]``)."""

    image: torch.Tensor
    winner: torch.Tensor
    pool_weights: torch.Tensor
    label: torch.Tensor
    conf: torch.Tensor
    box: torch.Tensor


def mix_winner(
    winner_a: torch.Tensor, winner_b: torch.Tensor, box: torch.Tensor, m: int
) -> torch.Tensor:
    """Winner map of the mixed image: ``winner_a`` outside ``box``, ``winner_b + m`` inside (−1,
    no mask, stays −1). All (H, W) int64."""
    shifted = torch.where(winner_b >= 0, winner_b + m, winner_b)
    return torch.where(box, shifted, winner_a)


def cutmix_batch(
    image: torch.Tensor,
    winner: torch.Tensor,
    pool_weights: torch.Tensor,
    label: torch.Tensor,
    conf: torch.Tensor,
    boxes: torch.Tensor,
    partner: torch.Tensor,
) -> MixedBatch:
    """Mix each item b with item ``partner[b]`` inside ``boxes[b]``.

    image (B, 3, H, W); winner (B, H, W) int64; pool_weights (B, M, h, w) (only its shape is
    used: the mixed weights are rebuilt from the mixed winner); label (B, H, W) int64 (pseudo-
    labels, 255 = ignore); conf (B, H, W) float; boxes (B, H, W) bool; partner (B,) int64.
    An item whose box is empty keeps its own pool weights' layout (padded to 2M).
    """
    b, m, h, w = pool_weights.shape
    sel = boxes[:, None]
    mixed_image = torch.where(sel, image[partner], image)
    mixed_label = torch.where(boxes, label[partner], label)
    mixed_conf = torch.where(boxes, conf[partner], conf)
    winners, pools = [], []
    for i in range(b):
        if not bool(boxes[i].any()):
            winners.append(winner[i])
            pools.append(torch.cat([pool_weights[i], pool_weights.new_zeros(m, h, w)]))
            continue
        mixed = mix_winner(winner[i], winner[int(partner[i])], boxes[i], m)
        winners.append(mixed)
        pools.append(pool_weights_from_winner(mixed, 2 * m, (h, w)))
    return MixedBatch(
        mixed_image, torch.stack(winners), torch.stack(pools), mixed_label, mixed_conf, boxes
    )


def strong_view(
    image: torch.Tensor,
    winner: torch.Tensor,
    pool_weights: torch.Tensor,
    label: torch.Tensor,
    conf: torch.Tensor,
    cfg: StrongConfig,
    rng: np.random.Generator,
) -> MixedBatch:
    """Photometric noise per image, then CutMix with the batch rolled by one (image b takes its
    box from image b−1); a batch of one is never mixed. Arguments as in :func:`cutmix_batch`."""
    bsz, _, height, width = image.shape
    noisy = torch.stack([photometric(image[i], cfg, rng) for i in range(bsz)])
    boxes = torch.stack([sample_box(height, width, cfg, rng) for _ in range(bsz)])
    if bsz < 2:
        boxes.zero_()
    partner = torch.roll(torch.arange(bsz), 1)
    return cutmix_batch(noisy, winner, pool_weights, label, conf, boxes, partner)
