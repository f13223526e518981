"""SLIC region proposals: counts, partition, min_region_area, ordering, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from opensam.masks.arrays import boxes_xywh
from opensam.masks.superpixels import (
    SuperpixelGenerator,
    compute_superpixels,
    merge_small_regions,
    rgb_to_lab,
)


def scene(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with a few flat blobs: (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((size, size, 3)), (size / 16, size / 16, 0))
    img = (field - field.min()) / (np.ptp(field) + 1e-9)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(3):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 8, size // 4))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.random(3)
    return (img * 255).astype(np.uint8)


def check_partition(ms, size: int) -> None:  # noqa: ANN001 - a MaskSet
    n = len(ms)
    assert ms.masks.shape == (n, size, size) and ms.masks.dtype == bool
    np.testing.assert_array_equal(ms.masks.sum(0), np.ones((size, size)))  # each pixel once
    assert ms.area.dtype == np.int32 and ms.bbox.dtype == np.int32
    np.testing.assert_array_equal(ms.area, ms.masks.reshape(n, -1).sum(1))
    assert np.all(np.diff(ms.area) <= 0)  # largest first
    np.testing.assert_array_equal(ms.bbox, boxes_xywh(ms.masks))
    assert ms.predicted_iou.dtype == ms.stability_score.dtype == np.float32
    assert np.all(ms.predicted_iou == 1.0) and np.all(ms.stability_score == 1.0)


@pytest.mark.parametrize("pps", [4, 8, 12, 16])
def test_about_pps_squared_segments_partitioning_the_image(pps: int) -> None:
    ms = compute_superpixels(scene(96, pps), pps)
    check_partition(ms, 96)
    assert 0.5 * pps * pps <= len(ms) <= 1.5 * pps * pps
    for mask in ms.masks[:20]:
        assert ndimage.label(mask)[1] == 1  # connected


@pytest.mark.parametrize("pps,min_area", [(16, 100), (8, 300), (4, 64 * 64 - 1)])
def test_min_region_area_is_honoured_by_merging(pps: int, min_area: int) -> None:
    img = scene(64, 1)
    before = compute_superpixels(img, pps)
    assert before.area.min() < min_area  # the case is not trivial
    ms = compute_superpixels(img, pps, min_region_area=min_area)
    check_partition(ms, 64)
    assert ms.area.min() >= min_area
    assert len(ms) < len(before)


def test_deterministic() -> None:
    img = scene(64, 2)
    a, b = compute_superpixels(img, 8, 10.0, 50), compute_superpixels(img.copy(), 8, 10.0, 50)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.bbox, b.bbox)


def test_compactness_changes_segments() -> None:
    img = scene(64, 3)
    a, b = compute_superpixels(img, 8, 1.0), compute_superpixels(img, 8, 100.0)
    assert a.masks.shape != b.masks.shape or not np.array_equal(a.masks, b.masks)


def test_merge_prefers_closest_colour_then_longest_border() -> None:
    # region 1 (2 px) touches region 0 along 2 edges and region 2 along 1 edge
    labels = np.array([[0, 0, 0, 0], [0, 1, 1, 2], [0, 2, 2, 2], [2, 2, 2, 2]])
    lab = np.zeros((4, 4, 3))
    lab[labels == 0] = 10.0
    lab[labels == 1] = 90.0
    lab[labels == 2] = 80.0
    by_border = merge_small_regions(labels, 3)
    assert by_border[1, 1] == by_border[0, 0] != by_border[3, 3]
    by_colour = merge_small_regions(labels, 3, lab)
    assert by_colour[1, 1] == by_colour[3, 3] != by_colour[0, 0]
    assert sorted(np.unique(by_colour).tolist()) == [0, 1]


def test_merge_noop_and_relabels_consecutively() -> None:
    labels = np.array([[5, 5, 9], [5, 5, 9]])
    np.testing.assert_array_equal(merge_small_regions(labels, 0), [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(merge_small_regions(labels, 3), np.zeros((2, 3)))


def test_generator_matches_function_and_rejects_bad_images() -> None:
    img = scene(48, 4)
    gen = SuperpixelGenerator(points_per_side=6, compactness=10.0, min_region_area=20)
    a, b = gen.generate(img, None), compute_superpixels(img, 6, 10.0, 20)
    np.testing.assert_array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_lab(img[..., 0])
    with pytest.raises(ValueError, match="uint8 RGB"):
        gen.generate(img.astype(np.float32))


def test_lab_matches_skimage() -> None:
    from skimage.color import rgb2lab

    img = scene(32, 5)
    stretched = (img.astype(np.float64) - img.min()) / (int(img.max()) - int(img.min()))
    np.testing.assert_allclose(rgb_to_lab(img), rgb2lab(stretched), atol=0.5)
