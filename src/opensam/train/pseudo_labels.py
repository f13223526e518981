"""Pseudo-labels: the teacher's hard predictions on the unlabelled pool, and their quality.

The folder they are written to is :mod:`opensam.train.pseudo_format`. The pool for a ratio r is
the first ``r * len(train)`` ids of ``splits["unlabelled"]`` (a fixed seeded order), so a larger
ratio's pool contains the smaller one's. Pseudo-label quality is measured against
``prepared/unlabelled_gt/<id>.png`` when the source has hidden ground truth; training never
reads that folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from opensam.constants import IGNORE_INDEX
from opensam.eval.evaluation import build_loader, predict_loader
from opensam.eval.metrics import confusion_matrix, miou_report
from opensam.images import read_label_png
from opensam.parallel.context import broadcast_object, current_runtime
from opensam.prepared import HIDDEN_GT_DIR, read_prepared
from opensam.train.pseudo_format import (
    CONFIDENCE_DIR,
    IDS_FILE,
    LABELS_DIR,
    confidence_to_uint8,
    hard_labels,
)
from opensam.train.pseudo_shards import predict_sharded

log = logging.getLogger(__name__)


def generate_pseudo_labels(
    model: nn.Module,
    prepared: Path,
    ids: list[str],
    masks: Path | None,
    out_dir: Path,
    conf_threshold: float | None,
    batch_size: int,
    use_masks: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Predict ``ids`` and write ``out_dir/{labels,confidence}/<id>.png`` and ``out_dir/ids.json``.

    ``out_dir`` is written in place (a stage wraps it in ``atomic_path``). Returns
    ``{"images": n, "mean_confidence": mean max prob in [0, 1], "ignored_fraction": share of
    pixels set to 255}`` plus ``"vs_hidden_gt"`` (a ``miou_report``, percent) when
    ``prepared/unlabelled_gt/<id>.png`` exists for some ids. ``class_names`` default to
    ``splits.json``'s classes.
    """
    out_dir, rt = Path(out_dir), current_runtime()
    if rt.is_main:  # under torchrun the other ranks write shards that rank 0 merges
        (out_dir / LABELS_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIDENCE_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / IDS_FILE).write_text(json.dumps(list(ids), indent=1) + "\n")
    if not ids:
        return {"images": 0, "mean_confidence": None, "ignored_fraction": None}
    if use_masks and masks is None:
        raise ValueError("use_masks=True needs a mask store")
    loader = build_loader(model, prepared, ids, None, masks if use_masks else None, batch_size)
    conf_sum, ignored, pixels = 0.0, 0, 0
    if rt.distributed:
        conf_sum, ignored, pixels = predict_sharded(
            model, loader, use_masks, conf_threshold, out_dir, rt
        )
    for batch_ids, log_probs in [] if rt.distributed else predict_loader(model, loader, use_masks):
        labels, conf = hard_labels(log_probs, conf_threshold)
        conf_u8 = confidence_to_uint8(conf)
        for i, image_id in enumerate(batch_ids):
            Image.fromarray(labels[i].numpy()).save(out_dir / LABELS_DIR / f"{image_id}.png")
            Image.fromarray(conf_u8[i]).save(out_dir / CONFIDENCE_DIR / f"{image_id}.png")
        conf_sum += float(conf.double().sum())
        ignored += int((labels == IGNORE_INDEX).sum())
        pixels += labels.numel()
    summary: dict[str, Any] = {
        "images": len(ids),
        "mean_confidence": round(conf_sum / pixels, 6),
        "ignored_fraction": round(ignored / pixels, 6),
    }
    names = list(class_names) if class_names is not None else list(read_prepared(prepared).classes)
    quality = measure_pseudo_quality(out_dir, prepared, ids, names) if rt.is_main else None
    quality = broadcast_object(quality)  # rank 0 reads out_dir before it renames it
    if quality is not None:
        summary["vs_hidden_gt"] = quality
    log.info("pseudo-labels: %s", {k: v for k, v in summary.items() if k != "vs_hidden_gt"})
    return summary


def measure_pseudo_quality(
    pseudo_dir: Path, prepared: Path, ids: Sequence[str], class_names: Sequence[str]
) -> dict[str, Any] | None:
    """mIoU report (percent) of ``pseudo_dir/labels`` against ``prepared/unlabelled_gt``.

    Only ids with a hidden ground-truth file count; ``None`` if there is none. Pixels the
    pseudo-label ignores (255, below the confidence threshold) are left out, as they are in
    training; ``ignored_fraction`` reports how many there are.
    """
    gt_dir = Path(prepared) / HIDDEN_GT_DIR
    with_gt = [i for i in ids if (gt_dir / f"{i}.png").is_file()]
    if not with_gt:
        return None
    num_classes = len(class_names)
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image_id in with_gt:
        pred = read_label_png(Path(pseudo_dir) / LABELS_DIR / f"{image_id}.png")
        gt = read_label_png(gt_dir / f"{image_id}.png", pred.shape)
        gt = np.where(pred == IGNORE_INDEX, IGNORE_INDEX, gt)
        conf = confusion_matrix(
            torch.from_numpy(pred.astype(np.int64)),
            torch.from_numpy(gt.astype(np.int64)),
            num_classes,
        )
        total += np.asarray(conf, dtype=np.int64)
    log.info("pseudo-label quality measured on %d/%d images with hidden GT", len(with_gt), len(ids))
    return miou_report(total, list(class_names))
