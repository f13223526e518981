"""The mask-quality report (``opensam.eval.mask_quality``): ABO, region-majority ceiling, masks per
image and uncovered share, on hand-made masks whose figures are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import region_masks, scene, write_tiny_project

from opensam.eval.mask_quality import (
    best_overlaps,
    label_segments,
    majority_labels,
    mask_quality,
    store_quality,
)
from opensam.masks.store import MaskStore
from opensam.prepared import read_prepared


def _label() -> np.ndarray:
    label = np.full((8, 8), 3, np.uint8)
    label[1:3, 1:3] = 0  # a 4-px lizard
    label[5:8, 5:8] = 0  # a second, 9-px lizard: two segments of one class
    label[0, 7] = 255
    return label


def test_segments_are_components_per_class_above_a_size() -> None:
    segs = label_segments(_label(), min_segment=1)
    assert sorted(int(s.sum()) for s in segs) == [4, 9, 50]
    assert sorted(int(s.sum()) for s in label_segments(_label(), min_segment=5)) == [9, 50]


def test_ground_truth_segments_as_masks_are_perfect() -> None:
    label = _label()
    masks = np.stack(sorted(label_segments(label, 1), key=lambda m: -m.sum()))
    q = mask_quality([(masks, label)], 4, min_segment=1)
    assert q["abo"] == 1.0 and q["ceiling_miou"] == 100.0 and q["uncovered"] == 0.0
    assert q["masks_per_image"] == 3 and q["segments"] == 3


def test_one_mask_over_everything_is_the_majority_class() -> None:
    label = _label()
    full = np.ones((1, 8, 8), bool)
    pred = majority_labels(full, label, 4)
    assert np.all(pred[label != 255] == 3)  # background is the majority
    q = mask_quality([(full, label)], 4, min_segment=1)
    # background IoU 50/63, lizard 0: mIoU over the two classes present
    assert q["ceiling_miou"] == pytest.approx(100 * (50 / 63) / 2, abs=0.01)
    assert q["abo"] == pytest.approx(np.mean([4 / 64, 9 / 64, 50 / 64]), abs=1e-3)


def test_best_overlap_takes_the_best_mask_and_uncovered_pixels_keep_their_label() -> None:
    label = _label()
    half = np.zeros((1, 8, 8), bool)
    half[0, 5:8, 5:7] = True  # 6 of the 9-px lizard's pixels
    best = best_overlaps(half, label_segments(label, 1))
    assert sorted(best.round(3).tolist()) == [0.0, 0.0, round(6 / 9, 3)]
    q = mask_quality([(half, label)], 4, min_segment=1)
    assert q["ceiling_miou"] == 100.0  # the one mask is pure; the rest is uncovered
    assert q["uncovered"] == pytest.approx(1 - 6 / 63, abs=1e-4)


def test_smaller_masks_paint_over_larger_ones() -> None:
    label = _label()
    big = np.ones((8, 8), bool)
    small = label == 0
    pred = majority_labels(np.stack([big, small]), label, 4)
    assert np.array_equal(pred[label != 255], label[label != 255])


def test_store_quality_reads_a_store_against_prepared_labels(tmp_path: Path) -> None:
    paths = write_tiny_project(tmp_path, n_train=2, n_val=2, n_test=1, n_unlab=1)
    prepared = read_prepared(paths["prepared"])
    store = MaskStore(paths["masks"])
    q = store_quality(store, prepared.val, prepared)
    # the tiny project's masks are its labels' class regions (conftest.region_masks)
    assert q["ceiling_miou"] == 100.0 and q["images"] == 2 and q["uncovered"] == 0.0
    assert 0.5 < q["abo"] <= 1.0
    json.dumps(q)  # a plain metrics record


def test_region_masks_of_a_scene_reach_full_ceiling() -> None:
    image, label = scene(np.random.default_rng(0), 48)
    del image
    q = mask_quality([(region_masks(label).masks, label)], 4)
    assert q["ceiling_miou"] == 100.0
