"""Stage `warmup`: fine-tune the teacher on the labelled train split (thesis Experiment 2).

    python stages/warmup.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --out models/teacher.pt \
        --metrics metrics/warmup.json --live metrics/live/warmup

Params: ``seed``, ``classes``, ``clip``, ``model`` (backbone, head), ``dino``, ``warmup.*``.
The best epoch by val mIoU (ties → the earlier) is saved; ``metrics/warmup.json`` holds its
mIoU with masks on train, val and test. With ``model.head_init`` prototypes, the head starts
from the mean labelled embedding per class of the train split.
A killed run resumes from ``<out dir>/.warmup_ckpt/`` (removed after success).
"""

from __future__ import annotations

import argparse
import logging

from opensam.config import load_params
from opensam.data.augment import Augmenter
from opensam.data.datasets import labelled_batches, make_train_loaders
from opensam.errors import InputError, params_blamed
from opensam.eval.evaluation import evaluate_splits
from opensam.masks.settings import open_mask_store, store_settings
from opensam.model.heads import class_prototypes
from opensam.model.segmenter import build_model, save_checkpoint
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import remove_path, run_main, seed_everything, stage_parser, write_json
from opensam.train.engine import TrainConfig
from opensam.train.losses import resolve_class_weights
from opensam.train.reporting import open_live
from opensam.train.resume import local_file, run_key
from opensam.train.supervised import train_model

log = logging.getLogger("stages.warmup")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(
        __doc__, "prepared", "masks", "data-metrics", "out", "metrics", "live"
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: data-parallel, rank 0 writes
    cfg = params.warmup
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    prepared.check_classes(params.class_names, f"{args.params} classes")
    store = open_mask_store(args.masks)
    if not prepared.train:
        raise InputError(f"{prepared.splits_path}: the train split is empty")
    train_labels = [prepared.label_path(i) for i in prepared.train]
    weights = resolve_class_weights(
        cfg.class_weights, params.class_names, args.data_metrics, train_labels
    )
    key = run_key(  # what the loop reads: a checkpoint of other values is not resumed
        {"seed": params.seed, "labelled_train": params.labelled_train, "classes": params.classes,
         "clip": params.clip, "warmup": cfg, "model": params.model, "dino": params.dino,
         "precision": params.runtime.precision, "nproc": params.runtime.nproc},
        {"clip.pretrained": local_file(params.clip.pretrained),
         "dino.pretrained": local_file(params.dino.pretrained), "prepared": args.prepared,
         "masks": args.masks if cfg.use_masks else None},
    )  # fmt: skip
    try:
        config = TrainConfig.from_params(cfg, weights, params.seed, key)
    except ValueError as exc:
        raise InputError(f"{args.params}: warmup: {exc}") from None
    log.info("class weights %s", [round(w, 4) for w in weights])

    model = build_model(params.clip, params.prompts, cfg.drop_path, params.model, params.dino)
    if params.model.resolved_init() == "prototypes" and model.head is not None:
        grid, size = model.grid_hw(prepared.image_size), cfg.batch_size
        batches = labelled_batches(prepared.root, prepared.train, grid, size)
        model.set_class_embeddings(class_prototypes(model.embed, batches, model.num_classes))
    train_loader, _, val_loader = make_train_loaders(
        prepared.root, prepared.train_epoch_ids, prepared.val,
        args.masks if cfg.use_masks else None, model.grid_hw(prepared.image_size), cfg.batch_size,
        params.seed,
        Augmenter() if cfg.augment else None, num_workers=cfg.num_workers,
    )  # fmt: skip
    ckpt_dir = args.out.parent / ".warmup_ckpt"
    live = open_live(args.live) if rt.is_main else None
    with params_blamed(args.params, "warmup"):
        result = train_model(
            model, train_loader, config, val_loader=val_loader, checkpoint_dir=ckpt_dir, live=live
        )
    if live is not None:
        live.end()
    report = evaluate_splits(
        model, prepared.root, prepared.split_ids(), args.masks, cfg.batch_size, params.class_names
    )
    if not rt.is_main:
        return 0
    save_checkpoint(
        args.out, model, params.class_names, params.clip, prepared.image_size,
        epoch=result.best_epoch, val_miou=result.best_miou, masks=store_settings(store),
        labelmap_colors=[list(c) for c in prepared.colors],
    )  # fmt: skip
    write_json(args.metrics, {"best_epoch": result.best_epoch, **report})
    remove_path(ckpt_dir)
    log.info(
        "teacher: best epoch %d, %s", result.best_epoch, {s: r["miou"] for s, r in report.items()}
    )
    return 0


if __name__ == "__main__":
    run_main(main)
