"""Stage `control`: the labelled-only control of the student (same init, schedule, steps).

    python stages/control.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt \
        --out models/control.pt --metrics metrics/control.json --live metrics/live/control

It trains what the student trains, minus the unlabelled data
(:func:`opensam.train.online_setup.train_control`): from the warm teacher, with the student's drop
path, augmentation, optimiser, learning-rate schedule and optimiser steps (``student.epochs`` ×
the labelled batches per epoch, in both modes), keeping the best epoch by val mIoU as the student
does. The ratio and the pseudo-labels are not read, so ``-S ratio=...`` does not rerun it. A
killed run resumes from ``<out dir>/.control_ckpt/``.
"""

from __future__ import annotations

import argparse
import logging

from opensam.config import load_params
from opensam.errors import params_blamed
from opensam.eval.evaluation import evaluate_splits
from opensam.masks.settings import check_store_settings, open_mask_store, store_settings
from opensam.model.segmenter import checkpoint_clip, load_checkpoint, save_checkpoint
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import remove_path, run_main, seed_everything, stage_parser, write_json
from opensam.train.losses import resolve_class_weights
from opensam.train.online_setup import train_control
from opensam.train.reporting import open_live
from opensam.train.resume import run_key

log = logging.getLogger("stages.control")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(
        __doc__, "prepared", "masks", "data-metrics", "teacher", "out", "metrics", "live"
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: data-parallel (both modes), rank 0 writes
    cfg = params.student
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    store = open_mask_store(args.masks)
    model, meta = load_checkpoint(args.teacher, drop_path=cfg.drop_path)
    classes = list(meta["classes"])
    prepared.check_classes(classes, str(args.teacher))
    check_store_settings(meta.get("masks"), store, args.teacher)
    train_labels = [prepared.label_path(i) for i in prepared.train]
    weights = resolve_class_weights(cfg.class_weights, classes, args.data_metrics, train_labels)
    ckpt, live = args.out.parent / ".control_ckpt", open_live(args.live) if rt.is_main else None
    # the seed of the student's (first) round
    key = run_key(  # what the control reads: a checkpoint of other values is not resumed
        {
            "seed": params.seed,
            "labelled_train": params.labelled_train,
            "student": cfg,
            "precision": params.runtime.precision,
            "nproc": params.runtime.nproc,
        },
        {"teacher": args.teacher, "prepared": args.prepared, "masks": args.masks},
    )
    with params_blamed(args.params, "student"):
        best_epoch, best_val = train_control(
            model, cfg, weights, params.seed + 1, prepared, args.masks, ckpt, live, key
        )
    if live is not None:
        live.end()
    report = evaluate_splits(
        model,
        prepared.root,
        prepared.split_ids(("val", "test")),
        args.masks,
        cfg.batch_size,
        classes,
        use_masks=cfg.use_masks,
    )
    if not rt.is_main:
        return 0
    save_checkpoint(
        args.out,
        model,
        classes,
        checkpoint_clip(meta, args.teacher),
        prepared.image_size,
        epoch=best_epoch,
        val_miou=best_val,
        masks=store_settings(store),
        labelmap_colors=meta.get("labelmap_colors"),
    )
    write_json(args.metrics, {"best_epoch": best_epoch, **report})
    remove_path(ckpt)
    log.info("control: best epoch %d, %s", best_epoch, {s: r["miou"] for s, r in report.items()})
    return 0


if __name__ == "__main__":
    run_main(main)
