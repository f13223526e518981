"""Stage `predict`: the best student labels the whole unlabelled pool (``predict.enabled``).

    python stages/predict.py --prepared data/prepared --student models/student.pt \
        --out data/predictions --metrics metrics/predict.json

Params: ``predict.*``, ``classes`` (names and overlay colours), and the mask settings of training
(``pps``, ``min_region_area``, ``masks.*``, ``sam.*``). Photos: every id of
``splits["unlabelled"]``, from its original file (``splits["sources"]``) when that is a plain file,
else the prepared image. Writes ``data/predictions/`` (layout in :mod:`opensam.apps.predict`) and
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

from opensam.apps.predict import (
    Photo,
    build_mask_generator,
    build_summary,
    score_class_maps,
    write_summary,
)
from opensam.apps.predict_shards import predict_photos_sharded
from opensam.config import Params, load_params
from opensam.eval.evaluation import class_colors, load_splits
from opensam.model.segmenter import load_checkpoint
from opensam.parallel.context import current_runtime, init_runtime, main_output
from opensam.runtime import atomic_path, run_main, seed_everything
from opensam.train.pseudo_labels import HIDDEN_GT_DIR

log = logging.getLogger("stages.predict")

METRIC_KEYS = (
    "images",
    "images_per_s",
    "failed",
    "mean_confidence",
    "low_conf_pct",
    "class_fractions",
)


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


def write_disabled(out: Path, metrics: Path) -> None:
    """``predict.enabled: false``: an empty output folder and ``{"enabled": false}``."""
    log.info("predict.enabled is false: writing an empty %s", out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
    with atomic_path(metrics) as tmp:
        tmp.write_text(json.dumps({"enabled": False}, indent=2) + "\n")


def predict_pool(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    """Predict the unlabelled pool into ``args.out``; return the metrics mapping."""
    splits = load_splits(args.prepared)
    photos = pool_photos(args.prepared, splits)
    model, meta = load_checkpoint(args.student, expected_classes=params.class_names)
    size = int(meta["image_size"])
    masks = build_mask_generator(
        params.masks.generator, params.pps, params.min_region_area, params.masks, params.sam, size
    )
    colors = class_colors([c.color for c in params.classes], splits.get("colors"))
    log.info("predicting %d unlabelled photos with %s", len(photos), args.student)
    with main_output(args.out) as tmp:  # under torchrun: rank 0 merges the ranks' shards
        result = predict_photos_sharded(
            model,
            photos,
            tmp,
            params.class_names,
            colors,
            size,
            masks,
            batch_size=params.predict.batch_size,
            low_conf=params.predict.low_conf,
        )
        if not current_runtime().is_main:
            return {}
        info = {"checkpoint": str(args.student), "masks": params.masks.generator}
        summary = build_summary(result, params.class_names, colors, info)
        write_summary(tmp, summary)
        ids = [p.id for p in photos]
        quality = score_class_maps(tmp, args.prepared / HIDDEN_GT_DIR, ids, params.class_names)
    metrics = {"enabled": True, **{k: summary[k] for k in METRIC_KEYS}}
    metrics["failed"] = len(summary["failed"])
    if quality is not None:
        metrics["vs_hidden_gt"] = quality
        log.info("predictions vs hidden ground truth: mIoU %.2f", quality["miou"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)
    if not params.predict.enabled:
        if rt.is_main:
            write_disabled(args.out, args.metrics)
        return 0
    metrics = predict_pool(args, params)
    if not rt.is_main:
        return 0
    with atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
