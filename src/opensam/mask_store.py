"""The HDF5 mask store: the one owner of writing and reading precomputed region masks.

(Skeleton: the MaskSet type is fixed here; the writer/reader are built by the masks work.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MaskSet:
    """Region masks of one image, sorted by area, largest first.

    masks: (n, H, W) bool; area: (n,) int32; predicted_iou, stability_score: (n,) float32;
    bbox: (n, 4) int32 xywh.
    """

    masks: np.ndarray
    area: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    bbox: np.ndarray
