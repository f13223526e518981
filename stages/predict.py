"""Stage `predict`: the best student labels the whole unlabelled pool.

    python stages/predict.py --prepared data/prepared --student models/student.pt \
        --out data/predictions --metrics metrics/predict.json

Params: ``predict.*``, ``classes`` (names and overlay colours), and the mask settings of training
(``pps``, ``min_region_area``, ``masks.*``, ``sam.*``). Photos: every id of
``splits["unlabelled"]``, from its original file (``splits["sources"]``) when that is a plain file,
else the prepared image. Writes ``data/predictions/`` (layout in :mod:`opensam.apps.predict`) and
``metrics/predict.json``: images, images/s, failed, mean confidence, class fractions (%), and
``vs_hidden_gt`` (mIoU against ``prepared/unlabelled_gt``, percent) when available. The masks are
those the student was trained with (recorded in its checkpoint).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from opensam.apps.predict import (
    Photo,
    build_summary,
    score_class_maps,
    write_summary,
)
from opensam.apps.predict_setup import build_mask_generator, choose_masks, overlay_colors
from opensam.apps.predict_shards import predict_photos_sharded
from opensam.config import Params, load_params
from opensam.model.segmenter import load_checkpoint
from opensam.parallel.context import current_runtime, init_runtime, main_output
from opensam.prepared import Prepared, read_prepared
from opensam.runtime import run_main, seed_everything, stage_parser, write_json

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
    return stage_parser(__doc__, "prepared", "student", "out", "metrics").parse_args(argv)


def pool_photos(prepared: Prepared) -> list[Photo]:
    """The unlabelled pool: original photo files where they exist, else prepared images."""
    photos = []
    for image_id in prepared.unlabelled:
        original = Path(prepared.sources.get(image_id, ""))
        use_original = image_id in prepared.sources and original.is_file()
        photos.append(Photo(image_id, original if use_original else prepared.image_path(image_id)))
    return photos


def predict_pool(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    """Predict the unlabelled pool into ``args.out``; return the metrics mapping."""
    prepared = read_prepared(args.prepared)
    photos = pool_photos(prepared)
    model, meta = load_checkpoint(args.student, params.class_names, classes_from=str(args.params))
    size = int(meta["image_size"])
    choice = choose_masks(meta, params, checkpoint=str(args.student))
    masks = build_mask_generator(choice, params.masks, params.sam, size, params.sam2)
    colors = overlay_colors(params, meta)
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
        info = {"checkpoint": str(args.student), "masks": choice.generator}
        summary = build_summary(result, params.class_names, colors, info)
        write_summary(tmp, summary)
        ids = [p.id for p in photos]
        quality = score_class_maps(tmp, prepared.hidden_gt_dir, ids, params.class_names)
    metrics = {**{k: summary[k] for k in METRIC_KEYS}, "failed": len(summary["failed"])}
    if quality is not None:
        metrics["vs_hidden_gt"] = quality
        log.info("predictions vs hidden ground truth: mIoU %.2f", quality["miou"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: ranks share the photos
    metrics = predict_pool(args, params)
    if not rt.is_main:
        return 0
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
