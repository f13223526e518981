"""Plot files for DVC: confusion-matrix rows for the ``confusion`` template, and a PNG of it.

DVC's ``confusion`` template draws a matrix from a JSON list of rows, one row per sample,
``{"actual": "<class>", "predicted": "<class>"}``. One row per pixel would be millions of rows for
a handful of 256x256 images, so :func:`confusion_rows` keeps one pixel per cell of a strided grid
(every ``stride``-th row and column, starting at ``stride // 2`` so the cell centres are sampled).
The grid is fixed (no randomness), so the file is reproducible and the class proportions match the
full-resolution confusion matrix up to the sampling. The exact matrix is in ``metrics/eval.json``
(per-class IoU) and :func:`save_confusion_png` draws it from the full counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opensam.constants import IGNORE_INDEX

log = logging.getLogger(__name__)

DEFAULT_STRIDE = 32  # 256x256 image -> 8x8 = 64 rows per image (200 test images: 0.7 MB)


def confusion_rows(
    pred: np.ndarray,
    target: np.ndarray,
    class_names: Sequence[str],
    stride: int = DEFAULT_STRIDE,
) -> list[dict[str, str]]:
    """Rows ``{"actual": name, "predicted": name}`` for the pixels of a strided grid.

    pred, target: (H, W) integer class ids. Pixels whose target is ``IGNORE_INDEX`` are skipped
    (they have no actual class); a prediction of ``IGNORE_INDEX`` is written as ``"ignore"``.
    Returns at most ``ceil(H / stride) * ceil(W / stride)`` rows, in row-major order.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be equal (H, W)")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    start = stride // 2
    p = np.asarray(pred)[start::stride, start::stride].ravel()
    t = np.asarray(target)[start::stride, start::stride].ravel()
    keep = t != IGNORE_INDEX
    names = [*class_names]
    return [
        {"actual": names[int(a)], "predicted": _name(names, int(b))}
        for a, b in zip(t[keep], p[keep], strict=True)
    ]


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else "ignore"


def write_confusion_json(path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``rows`` (from :func:`confusion_rows`) as the JSON list DVC's template reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=0) + "\n")
    log.info("wrote %s (%d rows)", path, len(rows))


def save_confusion_png(path: Path, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    """Draw the full confusion matrix, rows normalised to percent of each ground-truth class.

    confusion: (C, C) int64, rows = ground truth, columns = prediction. Needs matplotlib
    (imported here only, with the non-interactive Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(confusion, dtype=np.float64)
    totals = conf.sum(axis=1, keepdims=True)
    percent = np.divide(100.0 * conf, totals, out=np.zeros_like(conf), where=totals > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.0, 1.2 * n + 1.5))
    ax.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0)
    ax.set_xticks(range(n), labels=[*class_names], rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[*class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(n):
        for j in range(n):
            colour = "white" if percent[i, j] > 50.0 else "black"
            ax.text(j, i, f"{percent[i, j]:.1f}", ha="center", va="center", color=colour)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
