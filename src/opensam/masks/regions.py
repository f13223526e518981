"""Object-level region proposals without a model: graph-based segmentation merged hierarchically.

The offline stand-in for SAM's *object* masks (SLIC superpixels, :mod:`opensam.masks.superpixels`,
are a tiling of small cells). Felzenszwalb-Huttenlocher segmentation (``skimage``) gives the finest
level, with regions of about ``a0 = H·W / pps²`` pixels; each further level merges every region
smaller than ``a0 · 2^l`` into its neighbour of closest mean Lab colour, so the levels are nested. A
region is *stable* when it survives into the next level almost unchanged (IoU >= ``stable_iou`` with
the region that contains it there), like SAM's stability score: it is a whole object or part that
resists merging with its surroundings. The proposals are the stable regions of every level plus the
regions of the coarsest level, near-duplicates (IoU >= ``stable_iou``) kept once at the coarser
level. Painted largest first, each pixel ends up in the smallest stable region that contains it.
``min_region_area`` drops proposals smaller than it (their pixels keep the next larger proposal or
the per-pixel prediction)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from opensam.masks.arrays import MaskSet
from opensam.masks.superpixels import merge_small_regions, rgb_to_lab

log = logging.getLogger(__name__)


def region_levels(image: np.ndarray, points_per_side: int, levels: int = 4) -> list[np.ndarray]:
    """(H, W, 3) uint8 RGB → ``levels`` nested (H, W) int32 label maps, finest first."""
    h, w = image.shape[:2]
    a0 = max(4, h * w // max(1, points_per_side * points_per_side))
    fine = felzenszwalb(image, scale=a0 / 4, sigma=0.8, min_size=max(2, a0 // 4))
    lab = rgb_to_lab(image)
    out = [merge_small_regions(np.asarray(fine), a0, lab)]
    for level in range(1, levels):
        out.append(merge_small_regions(out[-1], a0 * 2**level, lab))
    return out


def _parent_iou(child: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For nested maps: each child region's parent id (k,) and IoU with that parent (k,)."""
    k = int(child.max()) + 1
    area_c = np.bincount(child.ravel(), minlength=k)
    # nested: every child pixel has the same parent, so any pixel names it
    first = np.full(k, -1, np.int64)
    flat_c, flat_p = child.ravel(), parent.ravel()
    first[flat_c[::-1]] = flat_p[::-1]
    area_p = np.bincount(flat_p, minlength=int(parent.max()) + 1)
    return first, area_c / np.maximum(area_p[first], 1)


def hierarchical_regions(
    image: np.ndarray,
    points_per_side: int,
    min_region_area: int = 0,
    levels: int = 4,
    stable_iou: float = 0.85,
) -> MaskSet:
    """(H, W, 3) uint8 RGB → MaskSet of stable multi-scale regions, largest first."""
    maps = region_levels(image, points_per_side, levels)
    h, w = image.shape[:2]
    chosen: list[np.ndarray] = []
    scores: list[float] = []
    last = len(maps) - 1
    # stability of every region of every level: IoU with its region one level up (top: 1)
    links = [_parent_iou(maps[i], maps[i + 1]) for i in range(last)]
    ious = [iou for _, iou in links] + [np.ones(int(maps[last].max()) + 1)]
    for level, labels in enumerate(maps):
        iou = ious[level]
        keep = iou >= stable_iou if level < last else np.ones(len(iou), bool)
        if level < last:  # a near-copy of a kept parent is kept once, at the coarser level
            parents = links[level][0]
            parent_kept = ious[level + 1][parents] >= stable_iou if level + 1 < last else True
            keep &= ~((iou >= 0.98) & parent_kept)
        for region in np.flatnonzero(keep):
            chosen.append(labels == region)
            scores.append(float(iou[region]))
    masks = np.stack(chosen) if chosen else np.zeros((0, h, w), bool)
    area = masks.reshape(len(masks), -1).sum(1).astype(np.int32)
    order = np.argsort(-area, kind="stable")
    order = order[area[order] >= max(1, min_region_area)]
    masks, area = masks[order], area[order]
    stability = np.asarray(scores, np.float32)[order] if len(scores) else np.zeros(0, np.float32)
    bbox = np.zeros((len(masks), 4), np.int32)
    for i, m in enumerate(masks):
        sl = ndimage.find_objects(m.astype(np.int32))[0]
        bbox[i] = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
    return MaskSet(
        masks=masks,
        area=area,
        predicted_iou=np.ones(len(masks), np.float32),
        stability_score=stability,
        bbox=bbox,
    )


class RegionGenerator:
    """MaskGenerator over :func:`hierarchical_regions` (``masks.generator: regions``)."""

    thread_safe = True  # generate() keeps no state: may run in worker threads (masks.workers)

    def __init__(self, points_per_side: int, min_region_area: int, levels: int = 4) -> None:
        self.points_per_side = points_per_side
        self.min_region_area = min_region_area
        self.levels = levels

    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        """(H, W, 3) uint8 → MaskSet with (n, H, W) bool masks; ``original`` is not used."""
        return hierarchical_regions(image, self.points_per_side, self.min_region_area, self.levels)
