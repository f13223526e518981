"""Stage `predict`: the best student labels the whole unlabelled pool (``predict.enabled``).

    python stages/predict.py --prepared data/prepared --student models/student.pt \
        --out data/predictions --metrics metrics/predict.json

Params: ``predict.*``, ``classes`` (names and overlay colours), and the mask settings of training
(``pps``, ``min_region_area``, ``masks.*``, ``sam.*``). Photos: every id of
``splits["unlabelled"]``, from its original file (``splits["sources"]``) when that is a plain file,
else the prepared image. Writes ``data/predictions/`` (layout in :mod:`opensam.predict`) and
``metrics/predict.json``: images, images/s, failed, mean confidence, class fractions (%), and
``vs_hidden_gt`` (mIoU against ``prepared/unlabelled_gt``, percent) when available. With
``predict.enabled: false`` both are written empty: ``{"enabled": false}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from opensam.config import load_params
from opensam.constants import IGNORE_INDEX
from opensam.evaluation import class_colors, load_splits
from opensam.images import resize_label
from opensam.metrics import confusion_matrix, miou_report
from opensam.model import load_checkpoint
from opensam.predict import (
    LABELS_DIR,
    Photo,
    build_mask_generator,
    build_summary,
    predict_photos,
    write_summary,
)
from opensam.pseudo_labels import read_label_png
from opensam.runtime import atomic_path, run_main, seed_everything

log = logging.getLogger("stages.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def pool_photos(prepared: Path, splits: dict[str, Any]) -> list[Photo]:
    """The unlabelled pool: original photo files where they exist, else prepared images."""
    sources = splits.get("sources") or {}
    photos = []
    for image_id in map(str, splits.get("unlabelled", [])):
        original = Path(str(sources.get(image_id, "")))
        use_original = image_id in sources and original.is_file()
        photos.append(
            Photo(image_id, original if use_original else prepared / "images" / f"{image_id}.png")
        )
    return photos


def score_vs_hidden_gt(
    pred_dir: Path, gt_dir: Path, ids: list[str], class_names: list[str]
) -> dict[str, Any] | None:
    """mIoU report (percent) of the predictions against ``gt_dir/<id>.png`` (mode L class ids),
    each prediction resized (nearest) to its ground truth's size; None without ground truth."""
    total = np.zeros((len(class_names),) * 2, dtype=np.int64)
    scored = 0
    for image_id in ids:
        gt_path, pred_path = gt_dir / f"{image_id}.png", pred_dir / LABELS_DIR / f"{image_id}.png"
        if not (gt_path.is_file() and pred_path.is_file()):
            continue
        gt = read_label_png(gt_path)
        pred = resize_label(read_label_png(pred_path), gt.shape)
        total += confusion_matrix(pred, gt, len(class_names), IGNORE_INDEX)
        scored += 1
    if not scored:
        return None
    log.info("mIoU vs hidden ground truth on %d/%d images", scored, len(ids))
    return {"images": scored, **miou_report(total, class_names)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    if not params.predict.enabled:
        log.info("predict.enabled is false: writing an empty %s", args.out)
        with atomic_path(args.out) as tmp:
            tmp.mkdir(parents=True)
        with atomic_path(args.metrics) as tmp:
            tmp.write_text(json.dumps({"enabled": False}, indent=2) + "\n")
        return 0
    splits = load_splits(args.prepared)
    photos = pool_photos(args.prepared, splits)
    model, meta = load_checkpoint(args.student, expected_classes=params.class_names)
    image_size = int(meta["image_size"])
    masks = build_mask_generator(
        params.masks.generator,
        params.pps,
        params.min_region_area,
        params.masks,
        params.sam,
        image_size,
    )
    colors = class_colors([c.color for c in params.classes], splits.get("colors"))
    log.info("predicting %d unlabelled photos with %s", len(photos), args.student)
    with atomic_path(args.out) as tmp:
        result = predict_photos(
            model,
            photos,
            tmp,
            params.class_names,
            colors,
            image_size,
            masks,
            batch_size=params.predict.batch_size,
            low_conf=params.predict.low_conf,
        )
        info = {
            "checkpoint": str(args.student),
            "masks": params.masks.generator,
            "image_size": image_size,
        }
        summary = build_summary(result, params.class_names, colors, info)
        write_summary(tmp, summary)
        quality = score_vs_hidden_gt(
            tmp, args.prepared / "unlabelled_gt", [p.id for p in photos], params.class_names
        )
    keys = (
        "images",
        "images_per_s",
        "failed",
        "mean_confidence",
        "low_conf_pct",
        "class_fractions",
    )
    metrics: dict[str, Any] = {"enabled": True, **{k: summary[k] for k in keys}}
    metrics["failed"] = len(summary["failed"])
    if quality is not None:
        metrics["vs_hidden_gt"] = quality
        log.info("predictions vs hidden ground truth: mIoU %.2f", quality["miou"])
    with atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
