"""How well a set of region masks fits the objects of labelled images, before any training.

For each labelled image the ground-truth *segments* are the connected components (8-connected)
of each class, at least ``min_segment`` pixels (``IGNORE_INDEX`` pixels are no segment). Against
them a mask set is scored by:

- **ABO**, the average best overlap: for each segment, the best IoU any single mask reaches with
  it, averaged over all segments (object-proposal recall, as in the proposal literature);
- the **region-majority ceiling**: the mIoU (one confusion matrix over the split, the project's
  convention) reached when every pixel takes the majority label of the mask that paints it
  (masks painted largest first, smaller win, as in the model): the best any classifier of
  regions can do with these masks. Pixels no mask covers keep their own label: the model gives
  them the per-pixel prediction, so they do not lower the bound;
- masks per image, and the share of labelled pixels that no mask covers.

This is what a user should look at before training: whether the SAM settings (``pps``,
``min_region_area``) fit their objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError
from opensam.eval.metrics import confusion_matrix, miou_from_confusion
from opensam.images import read_label_png
from opensam.masks.arrays import compute_winner
from opensam.masks.store import MaskStore
from opensam.prepared import Prepared

log = logging.getLogger(__name__)

MIN_SEGMENT = 16  # px at image_size: smaller ground-truth components are not counted in ABO


def label_segments(label: np.ndarray, min_segment: int = MIN_SEGMENT) -> list[np.ndarray]:
    """(H, W) class ids → the (H, W) bool masks of each class's 8-connected components of at
    least ``min_segment`` pixels (IGNORE_INDEX skipped)."""
    out = []
    for cls in np.unique(label):
        if cls == IGNORE_INDEX:
            continue
        n, comp = cv2.connectedComponents((label == cls).view(np.uint8), connectivity=8)
        sizes = np.bincount(comp.ravel(), minlength=n)
        out += [comp == k for k in range(1, n) if sizes[k] >= min_segment]
    return out


def best_overlaps(masks: np.ndarray, segments: list[np.ndarray]) -> np.ndarray:
    """(n, H, W) bool masks, k segments → (k,) best IoU of any mask with each segment."""
    if not segments:
        return np.zeros(0)
    if not len(masks):
        return np.zeros(len(segments))
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    seg = np.stack(segments).reshape(len(segments), -1).astype(np.float32)
    inter = seg @ flat.T  # (k, n) overlapping pixels
    union = seg.sum(1)[:, None] + flat.sum(1)[None, :] - inter
    return np.asarray((inter / np.maximum(union, 1)).max(1), np.float64)


def majority_labels(masks: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids where each pixel takes the majority (non-ignored) label of the mask that
    paints it (masks sorted largest first); uncovered pixels and masks with no labelled pixel
    keep the pixel's own label."""
    winner = compute_winner(masks).astype(np.int64)
    out = label.astype(np.int64).copy()
    covered = (winner >= 0) & (label != IGNORE_INDEX)
    counts = np.bincount(
        winner[covered] * num_classes + label[covered],
        minlength=len(masks) * num_classes,
    ).reshape(len(masks), num_classes)
    has = counts.sum(1) > 0
    major = counts.argmax(1)
    paint = (winner >= 0) & has[np.maximum(winner, 0)]
    out[paint] = major[winner[paint]]
    return out


@dataclass
class MaskQuality:
    """Accumulates :mod:`opensam.eval.mask_quality`'s figures over images; :meth:`report`."""

    num_classes: int
    min_segment: int = MIN_SEGMENT

    def __post_init__(self) -> None:
        self.overlaps: list[np.ndarray] = []
        self.conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.counts: list[int] = []
        self.uncovered = 0
        self.labelled = 0

    def add(self, masks: np.ndarray, label: np.ndarray) -> None:
        """One image: (n, H, W) bool masks sorted largest first, (H, W) uint8 label."""
        if masks.shape[1:] != label.shape:
            raise ValueError(f"masks {masks.shape[1:]} and label {label.shape} differ in size")
        self.overlaps.append(best_overlaps(masks, label_segments(label, self.min_segment)))
        valid = label != IGNORE_INDEX
        pred = majority_labels(masks, label, self.num_classes)
        self.conf += confusion_matrix(np.where(valid, pred, 0), label, self.num_classes)
        self.counts.append(len(masks))
        covered = masks.any(0) if len(masks) else np.zeros(label.shape, bool)
        self.uncovered += int((valid & ~covered).sum())
        self.labelled += int(valid.sum())

    def report(self) -> dict[str, float]:
        """ABO (0..1, 3 decimals), ceiling mIoU (percent), masks per image, uncovered share."""
        best = np.concatenate(self.overlaps) if self.overlaps else np.zeros(0)
        counts = np.asarray(self.counts, np.float64)
        return {
            "abo": round(float(best.mean()), 3) if best.size else float("nan"),
            "ceiling_miou": round(100 * miou_from_confusion(self.conf), 2),
            "masks_per_image": round(float(counts.mean()), 1) if counts.size else 0.0,
            "uncovered": round(self.uncovered / max(1, self.labelled), 4),
            "segments": int(best.size),
            "images": len(self.counts),
        }


def mask_quality(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    min_segment: int = MIN_SEGMENT,
) -> dict[str, float]:
    """:meth:`MaskQuality.report` over ``(masks, label)`` pairs."""
    acc = MaskQuality(num_classes, min_segment)
    for masks, label in pairs:
        acc.add(masks, label)
    return acc.report()


def store_quality(
    store: MaskStore, ids: Sequence[str], prepared: Prepared, min_segment: int = MIN_SEGMENT
) -> dict[str, float]:
    """:func:`mask_quality` of ``store``'s masks of ``ids`` against their prepared labels."""
    size = prepared.image_size
    if store.image_shape != (size, size):
        raise InputError(f"{store.path}: masks are not {size}x{size} like the prepared images")

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for image_id in ids:
            label = read_label_png(prepared.label_path(image_id), (size, size))
            yield store.read(image_id).masks, label

    return mask_quality(pairs(), len(prepared.classes), min_segment)
