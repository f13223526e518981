"""Stage `control`: the labelled-only control of the student (same init, schedule, steps).

    python stages/control.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt \
        --out models/control.pt --metrics metrics/control.json --live metrics/live/control

It trains exactly what the student trains, minus the unlabelled data: it starts from the warm
teacher with the student's drop path, augmentation, optimiser, learning-rate schedule and
optimiser steps (``student.epochs`` × the labelled batches per epoch, in both modes), and keeps
the best epoch by val mIoU as the student does. ``student.mode: online``: the online loop with
λ = 0 (the returned model is its EMA teacher, as the student's is); ``offline``: one round of the
offline loop with α = 0 (every round of the student restarts from the warm teacher with this
schedule). The ratio and the pseudo-labels are not read, so ``-S ratio=...`` does not rerun it.
A killed run resumes from ``<out dir>/.control_ckpt/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from opensam.augment import Augmenter
from opensam.config import ClipParams, Params, load_params
from opensam.datasets import make_train_loaders
from opensam.errors import InputError
from opensam.evaluation import load_splits
from opensam.model import OpenSamModel, load_checkpoint, save_checkpoint
from opensam.runtime import atomic_path, remove_path, run_main, seed_everything
from opensam.train.online_setup import MODES, online_config, run_online
from opensam.training import (
    TrainConfig,
    evaluate_splits,
    open_live,
    resolve_class_weights,
    train_model,
)

log = logging.getLogger("stages.control")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared", "masks", "data-metrics", "teacher", "out", "metrics", "live"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def train_control(
    args: argparse.Namespace, params: Params, weights: list[float], splits: dict[str, object]
) -> tuple[OpenSamModel, int, float | None]:
    """Train the control; returns (model at its best epoch, best epoch, its val mIoU)."""
    cfg, seed = params.student, params.seed + 1  # the seed of the student's (first) round
    model, _ = load_checkpoint(args.teacher, drop_path=cfg.drop_path)
    ckpt, live = args.out.parent / ".control_ckpt", open_live(args.live)
    try:
        if cfg.mode == "online":
            config = online_config(cfg, weights, seed, control=True)
            data = (args.prepared, args.masks, dict(splits))
            res = run_online(model, cfg, config, data, [], ckpt, live)
            live.end()
            return model, res.best_epoch, res.best_miou
        base = dataclasses.replace(TrainConfig.from_params(cfg, weights, seed), alpha_f=0.0)
    except ValueError as exc:
        raise InputError(f"{args.params}: student: {exc}") from None
    grid = model.grid_hw(int(splits["image_size"]))  # type: ignore[call-overload]
    train, _, val = make_train_loaders(
        args.prepared, splits["train"], splits.get("val", []),  # type: ignore[arg-type]
        args.masks if cfg.use_masks else None, grid, cfg.batch_size, seed,
        Augmenter() if cfg.augment else None, None, cfg.num_workers,
    )  # fmt: skip
    result = train_model(model, train, base, val_loader=val, checkpoint_dir=ckpt, live=live)
    live.end()
    return model, result.best_epoch, result.best_miou


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    if params.student.mode not in MODES:
        raise InputError(f"{args.params}: student.mode must be one of {', '.join(MODES)}")
    splits = load_splits(args.prepared)
    if not args.masks.is_file():
        raise InputError(f"{args.masks}: mask store not found (run the masks stage)")
    _, meta = load_checkpoint(args.teacher)
    classes = list(meta["classes"])
    weights = resolve_class_weights(params.student.class_weights, classes, args.data_metrics)
    model, best_epoch, best_val = train_control(args, params, weights, splits)
    report = evaluate_splits(
        model, args.prepared, {s: splits.get(s, []) for s in ("val", "test")}, args.masks,
        params.student.batch_size, classes, use_masks=params.student.use_masks,
    )  # fmt: skip
    save_checkpoint(args.out, model, classes, ClipParams(**meta["clip"]), int(meta["image_size"]),
                    epoch=best_epoch, val_miou=best_val)  # fmt: skip
    with atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps({"best_epoch": best_epoch, **report}, indent=2) + "\n")
    remove_path(args.out.parent / ".control_ckpt")
    log.info("control: best epoch %d, %s", best_epoch, {s: r["miou"] for s, r in report.items()})
    return 0


if __name__ == "__main__":
    run_main(main)
