"""Stage `oracle`: the student trained on the pool's hidden ground truth (the upper bound).

    python stages/oracle.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt \
        --out models/oracle.pt --metrics metrics/oracle.json --live metrics/live/oracle

The student's own run (:mod:`opensam.train.oracle`): the same init (the warm teacher), schedule,
steps, augmentation, seed and mode, the EMA teacher included online, with the pool's true labels
(``prepared/unlabelled_gt``) in place of the teacher's pseudo-labels. Params: ``seed``,
``ratio``, ``labelled_train`` and the ``student.*`` values its run reads (not
``student.conf_threshold``: a true label is always confident). A data set without hidden ground
truth skips the training with one log line: ``--metrics`` then holds ``{"skipped": reason}`` and
``--out`` a marker that is no checkpoint (``evaluate`` reads the metrics and leaves the oracle
out). A killed run resumes from ``<out dir>/.oracle_ckpt/``.
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
from opensam.train.oracle import skip_reason, write_skipped, write_truth_folder
from opensam.train.reporting import open_live
from opensam.train.resume import run_key
from opensam.train.self_training import SelfTrainingInputs, run_self_training

log = logging.getLogger("stages.oracle")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(
        __doc__, "prepared", "masks", "data-metrics", "teacher", "out", "metrics", "live"
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: data-parallel, rank 0 writes
    cfg = params.student
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    pool_ids = tuple(prepared.pool_ids(params.ratio))
    reason = skip_reason(prepared, pool_ids)
    if reason is not None:
        log.info("oracle skipped: %s", reason)
        if rt.is_main:
            write_skipped(args.out, args.metrics, reason)
        return 0
    store = open_mask_store(args.masks)
    meta = read_checkpoint_meta(args.teacher)
    classes = tuple(meta["classes"])
    prepared.check_classes(classes, str(args.teacher))
    check_store_settings(meta.get("masks"), store, args.teacher)
    train_labels = [prepared.label_path(i) for i in prepared.train]
    weights = resolve_class_weights(
        cfg.class_weights, list(classes), args.data_metrics, train_labels
    )
    key = run_key(  # what the run reads: a checkpoint of other values is not resumed
        {"oracle": True, "seed": params.seed, "ratio": params.ratio,
         "labelled_train": params.labelled_train, "student": cfg,
         "precision": params.runtime.precision, "nproc": params.runtime.nproc},
        {"teacher": args.teacher, "prepared": args.prepared, "masks": args.masks},
    )  # fmt: skip
    try:
        base = TrainConfig.from_params(cfg, weights, params.seed, key)
    except ValueError as exc:
        raise InputError(f"{args.params}: student: {exc}") from None
    ckpt_root = args.out.parent / ".oracle_ckpt"
    truth = prepared.hidden_gt_dir
    if cfg.mode == "offline":  # the rounds read a pseudo-label folder: the truth in its format
        truth = write_truth_folder(prepared, pool_ids, ckpt_root / "truth")
    inputs = SelfTrainingInputs(prepared, args.masks, args.teacher, truth, pool_ids, classes)
    live = open_live(args.live) if rt.is_main else None
    with params_blamed(args.params, "student"):
        if cfg.mode == "online":  # the student's run and seed; the truth in place of the teacher
            seed = params.seed + 1
            result = run_online_student(
                inputs, cfg, weights, seed, ckpt_root, live, key, pool_labels=truth
            )
        else:
            result = run_self_training(
                inputs, cfg, params.pseudo, base, ckpt_root, live, relabel=False
            )
    if live is not None:
        live.end()
    if not rt.is_main:
        return 0
    save_checkpoint(
        args.out, result.model, list(classes), checkpoint_clip(meta, args.teacher),
        prepared.image_size, iteration=result.best_round, val_miou=result.best_val,
        masks=store_settings(store), labelmap_colors=meta.get("labelmap_colors"),
    )  # fmt: skip
    report = {"mode": cfg.mode, "pool_images": len(pool_ids), **result.report}
    write_json(args.metrics, report)
    remove_path(ckpt_root)
    log.info("oracle: best val mIoU %.2f", result.best_val)
    return 0


if __name__ == "__main__":
    run_main(main)
