"""Stage `student`: self-training rounds with pseudo-labels (thesis Experiment 3).

    python stages/student.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt --pseudo data/pseudo \
        --out models/student.pt --metrics metrics/student.json --live metrics/live/student

Params: ``seed``, ``ratio``, ``student.*``, ``pseudo.*``. ``student.mode: offline``: the thesis's
rounds (:func:`opensam.train.self_training.run_self_training`); ``online``: one weak-to-strong run
with an EMA teacher (:func:`opensam.train.online_setup.run_online_student`; ``--pseudo`` then only
measures the warm teacher's pseudo-labels). The best student by val mIoU is saved. A killed run
resumes from ``<out dir>/.student_ckpt/`` (removed after success).
"""

from __future__ import annotations

import argparse
import logging

from opensam.config import load_params
from opensam.errors import InputError, params_blamed
from opensam.masks.settings import check_store_settings, open_mask_store, store_settings
from opensam.model.segmenter import checkpoint_clip, read_checkpoint_meta, save_checkpoint
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import remove_path, run_main, seed_everything, stage_parser, write_json
from opensam.train.engine import TrainConfig
from opensam.train.losses import resolve_class_weights
from opensam.train.online_setup import run_online_student
from opensam.train.pseudo_format import load_pseudo_ids
from opensam.train.reporting import open_live
from opensam.train.resume import run_key
from opensam.train.self_training import SelfTrainingInputs, run_self_training

log = logging.getLogger("stages.student")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(
        __doc__, "prepared", "masks", "data-metrics", "teacher", "pseudo", "out", "metrics", "live"
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: data-parallel, rank 0 writes
    cfg = params.student
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    store = open_mask_store(args.masks)
    meta = read_checkpoint_meta(args.teacher)
    classes = tuple(meta["classes"])
    prepared.check_classes(classes, str(args.teacher))
    check_store_settings(meta.get("masks"), store, args.teacher)
    pool_ids = tuple(prepared.pool_ids(params.ratio))
    if not set(pool_ids) <= set(load_pseudo_ids(args.pseudo)):
        raise InputError(f"{args.pseudo}: no pseudo-labels for ratio {params.ratio}'s pool")
    train_labels = [prepared.label_path(i) for i in prepared.train]
    weights = resolve_class_weights(
        cfg.class_weights, list(classes), args.data_metrics, train_labels
    )
    key = run_key(  # what the rounds read: a checkpoint of other values is not resumed
        {
            "seed": params.seed,
            "ratio": params.ratio,
            "labelled_train": params.labelled_train,
            "student": cfg,
            "pseudo": params.pseudo,
            "precision": params.runtime.precision,
            "nproc": params.runtime.nproc,
        },
        {
            "teacher": args.teacher,
            "prepared": args.prepared,
            "pseudo": args.pseudo,
            "masks": args.masks,
        },
    )
    try:
        base = TrainConfig.from_params(cfg, weights, params.seed, key)
    except ValueError as exc:
        raise InputError(f"{args.params}: student: {exc}") from None
    inputs = SelfTrainingInputs(prepared, args.masks, args.teacher, args.pseudo, pool_ids, classes)
    ckpt_root = args.out.parent / ".student_ckpt"
    live = open_live(args.live) if rt.is_main else None
    with params_blamed(args.params, "student"):
        if cfg.mode == "online":  # one weak-to-strong run; seed = the offline first round's
            seed = params.seed + 1
            result = run_online_student(inputs, cfg, weights, seed, ckpt_root, live, key)
        else:
            result = run_self_training(inputs, cfg, params.pseudo, base, ckpt_root, live)
    if live is not None:
        live.end()
    if not rt.is_main:
        return 0
    save_checkpoint(
        args.out,
        result.model,
        list(classes),
        checkpoint_clip(meta, args.teacher),
        prepared.image_size,
        iteration=result.best_round,
        val_miou=result.best_val,
        masks=store_settings(store),
        labelmap_colors=meta.get("labelmap_colors"),
    )
    write_json(args.metrics, result.report)
    remove_path(ckpt_root)
    return 0


if __name__ == "__main__":
    run_main(main)
