"""The graph-based hierarchical region generator (``masks.generator: regions``)."""

from __future__ import annotations

import numpy as np

from opensam.config import MasksParams, SamParams
from opensam.masks.generators import build_generator
from opensam.masks.regions import hierarchical_regions, region_levels


def _image(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """64×64 noisy paper with a dark-green blob and a red rectangle; returns the object masks."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(225, 6, (64, 64, 3)), 0, 255)
    yy, xx = np.mgrid[:64, :64]
    blob = (yy - 20) ** 2 + (xx - 18) ** 2 < 12**2
    rect = (yy >= 36) & (yy < 58) & (xx >= 30) & (xx < 60)
    img[blob] = rng.normal((60, 110, 50), 5, (int(blob.sum()), 3))
    img[rect] = rng.normal((200, 40, 40), 5, (int(rect.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), [blob, rect]


def _best_iou(masks: np.ndarray, target: np.ndarray) -> float:
    inter = (masks & target).sum((1, 2))
    union = (masks | target).sum((1, 2))
    return float((inter / np.maximum(union, 1)).max())


def test_levels_are_nested_and_coarsen() -> None:
    img, _ = _image()
    maps = region_levels(img, 8)
    counts = [int(m.max()) + 1 for m in maps]
    assert counts == sorted(counts, reverse=True)
    for fine, coarse in zip(maps, maps[1:], strict=False):
        for r in range(int(fine.max()) + 1):
            assert len(np.unique(coarse[fine == r])) == 1  # every fine region has one parent


def test_objects_are_proposed_whole_and_sorted_largest_first() -> None:
    img, objects = _image()
    ms = hierarchical_regions(img, 8)
    assert ms.masks.dtype == bool and ms.masks.shape[1:] == (64, 64)
    assert np.all(np.diff(ms.area) <= 0)
    assert np.array_equal(ms.area, ms.masks.sum((1, 2)))
    for obj in objects:
        assert _best_iou(ms.masks, obj) > 0.8
    big = hierarchical_regions(img, 8, min_region_area=500)
    assert np.all(big.area >= 500)


def test_registered_as_a_mask_generator() -> None:
    img, objects = _image(1)
    gen = build_generator("regions", 8, 0, MasksParams(generator="regions"), SamParams(), 64)
    ms = gen.generate(img)
    assert _best_iou(ms.masks, objects[1]) > 0.8
