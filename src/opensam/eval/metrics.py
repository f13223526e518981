"""Confusion matrix and mIoU: the one implementation every stage uses.

Convention: pixels whose ground truth is ``IGNORE_INDEX`` (255) are left out. The IoU of a class
is ``TP / (TP + FP + FN)``; a class absent from both the ground truth and the prediction has no
IoU (NaN) and does not count. mIoU is the mean over the classes present in the ground truth or
the prediction (the common convention, e.g. torchmetrics' per-class Jaccard averaged over the
classes with a non-empty union).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from opensam.constants import IGNORE_INDEX

log = logging.getLogger(__name__)


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Pixel confusion matrix (C, C) int64: rows = ground truth, columns = prediction.

    pred, target: integer arrays or tensors of the same shape (any shape). Target pixels equal to
    ``ignore_index`` are skipped; any other value outside [0, C) is an error.
    """
    p = _to_numpy(pred).reshape(-1).astype(np.int64, copy=False)
    t = _to_numpy(target).reshape(-1).astype(np.int64, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} pixels but target has {t.size}")
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target values outside [0, {num_classes}) and not {ignore_index}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction values outside [0, {num_classes})")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU (C,) float64 in [0, 1]; NaN for classes absent from GT and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou_from_confusion(conf: np.ndarray) -> float:
    """Mean IoU in [0, 1] over the classes present in the ground truth or the prediction.

    NaN when no pixel was counted at all.
    """
    iou = iou_from_confusion(conf)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else math.nan


def _percent(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * x, 2)


def miou_report(conf: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """``{"miou": percent (2 decimals), "iou": {name: percent or None}}`` for metrics JSON.

    None marks a class absent from both ground truth and prediction.
    """
    iou = iou_from_confusion(conf)
    if len(class_names) != iou.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {iou.shape[0]}-class matrix")
    return {
        "miou": _percent(miou_from_confusion(conf)),
        "iou": {name: _percent(float(v)) for name, v in zip(class_names, iou, strict=True)},
    }


def format_miou_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Sequence[str],
    headers: Sequence[str],
    row_names: Mapping[str, str] | None = None,
    reference: Mapping[str, Mapping[str, float]] | None = None,
    reference_name: str = "*thesis*",
) -> str:
    """Markdown table: one row per ``results`` key (cells ``results[key][column]``, blank where
    missing), each followed by its ``reference`` row (e.g. the thesis's numbers) when there is one.
    ``headers`` are the titles of the name column and of ``columns``."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for key, row in results.items():
        rows = [((row_names or {}).get(key, key), row)]
        rows += [(reference_name, reference[key])] if reference and key in reference else []
        for name, vals in rows:
            cells = [f"{vals[c]:.2f}" if vals.get(c) is not None else "" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
