"""Stage `student`: self-training rounds with pseudo-labels (thesis Experiment 3).

    python stages/student.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt --pseudo data/pseudo \
        --out models/student.pt --metrics metrics/student.json --live metrics/live/student

Params: ``seed``, ``ratio``, ``student.*``, ``pseudo.*``. Round r trains a noisy student that
starts from the warm teacher, on labelled + pseudo-labelled batches (loss weight α(t) ramped).
Round 1 uses ``--pseudo`` (the pseudolabel stage); round r ≥ 2 relabels the pool with the best
student so far. The best student by val mIoU (ties → the earlier round) is saved. A killed run
resumes from ``<out dir>/.student_ckpt/`` (removed after success).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

from opensam.config import ClipParams, Params, StudentParams, load_params
from opensam.data.augment import Augmenter
from opensam.data.datasets import make_train_loaders
from opensam.errors import InputError
from opensam.eval.evaluation import load_splits
from opensam.model.segmenter import OpenSamModel, load_checkpoint, save_checkpoint
from opensam.parallel.context import barrier, init_runtime, main_output
from opensam.runtime import atomic_path, remove_path, run_main, seed_everything
from opensam.train.loop import TrainConfig, train_model
from opensam.train.losses import resolve_class_weights
from opensam.train.pseudo_labels import (
    generate_pseudo_labels,
    load_pseudo_ids,
    measure_pseudo_quality,
    select_pool_ids,
)
from opensam.train.reporting import evaluate_splits, open_live

log = logging.getLogger("stages.student")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared", "masks", "data-metrics", "teacher", "pseudo", "out", "metrics"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def relabel_pool(
    args: argparse.Namespace, params: Params, state: dict[str, Any], ids: list[str], out: Path
) -> dict[str, Any] | None:
    """Pseudo-label ``ids`` with the model holding ``state`` into ``out`` (kept for a resume);
    returns their quality vs hidden ground truth (None if unknown or ``out`` already existed)."""
    if out.is_dir():
        return None
    teacher, meta = load_checkpoint(args.teacher)
    teacher.load_state_dict(state)
    conf, batch, names = params.pseudo.conf_threshold, params.pseudo.batch_size, meta["classes"]
    with main_output(out) as tmp:  # under torchrun: rank 0 merges the ranks' shards
        summary = generate_pseudo_labels(
            teacher, args.prepared, ids, args.masks, tmp, conf, batch, class_names=names
        )
    barrier()  # every rank trains on ``out`` next: wait until rank 0 has renamed it
    return summary.get("vs_hidden_gt")


def train_round(
    args: argparse.Namespace, cfg: StudentParams, config: TrainConfig, splits: dict[str, Any],
    pool: tuple[list[str], Path], ckpt_dir: Path, live: Any,
) -> OpenSamModel:  # fmt: skip
    """Train one noisy student from the warm teacher; returns it holding its best epoch."""
    model, _ = load_checkpoint(args.teacher, drop_path=cfg.drop_path)
    grid_hw = model.grid_hw(int(splits["image_size"]))
    masks, aug = args.masks if cfg.use_masks else None, Augmenter() if cfg.augment else None
    train, pseudo, val = make_train_loaders(
        args.prepared, splits["train"], splits.get("val", []), masks, grid_hw, cfg.batch_size,
        config.seed, aug, pool, cfg.num_workers,
    )  # fmt: skip
    train_model(model, train, config, val_loader=val, pseudo_loader=pseudo,
                checkpoint_dir=ckpt_dir, live=live)  # fmt: skip
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: DDP, rank 0 writes
    cfg, splits = params.student, load_splits(args.prepared)
    if cfg.iterations < 1:
        raise InputError(f"{args.params}: student.iterations must be >= 1")
    if not args.masks.is_file():
        raise InputError(f"{args.masks}: mask store not found (run the masks stage)")
    _, meta = load_checkpoint(args.teacher)
    classes = list(meta["classes"])
    pool_ids = select_pool_ids(splits.get("unlabelled", []), len(splits["train"]), params.ratio)
    if not set(pool_ids) <= set(load_pseudo_ids(args.pseudo)):
        raise InputError(f"{args.pseudo}: no pseudo-labels for ratio {params.ratio}'s pool")
    weights = resolve_class_weights(cfg.class_weights, classes, args.data_metrics)
    try:
        base = TrainConfig.from_params(cfg, weights, params.seed)
    except ValueError as exc:
        raise InputError(f"{args.params}: student: {exc}") from None
    score = functools.partial(
        evaluate_splits, prepared=args.prepared, masks=args.masks, batch_size=cfg.batch_size,
        class_names=classes, use_masks=cfg.use_masks,
    )  # fmt: skip
    ckpt_root = args.out.parent / ".student_ckpt"
    live = open_live(args.live) if rt.is_main else None
    report: dict[str, Any] = {}
    best: tuple[int, float, dict[str, Any]] | None = None  # (round, val mIoU, weights)
    pseudo_dir, quality = args.pseudo, None
    for r in range(1, cfg.iterations + 1):
        if best is not None:  # the best student so far is the teacher
            pseudo_dir = ckpt_root / f"pseudo{r}"
            quality = relabel_pool(args, params, best[2], pool_ids, pseudo_dir)
        config = dataclasses.replace(base, seed=params.seed + r)
        pool = (pool_ids, pseudo_dir)
        model = train_round(args, cfg, config, splits, pool, ckpt_root / f"iter{r}", live)
        scores = score(model, split_ids={s: splits.get(s, []) for s in ("train", "val")})
        quality = quality or measure_pseudo_quality(pseudo_dir, args.prepared, pool_ids, classes)
        report[f"iter{r}"] = {**scores, "pseudo": quality or {"miou": None}}
        val = scores.get("val", scores["train"])["miou"] or 0.0
        if best is None or val > best[1]:
            best = (r, val, {k: v.clone() for k, v in model.state_dict().items()})
    if live is not None:
        live.end()
    assert best is not None
    model.load_state_dict(best[2])
    test = score(model, split_ids={"test": splits.get("test", [])})
    report["best"] = {"iter": best[0], "val": report[f"iter{best[0]}"].get("val"), **test}
    clip = ClipParams(**meta["clip"])
    if not rt.is_main:
        return 0
    save_checkpoint(args.out, model, classes, clip, int(meta["image_size"]), iteration=best[0],
                    val_miou=best[1])  # fmt: skip
    with atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    remove_path(ckpt_root)
    log.info("student: best round %d, val mIoU %.2f", best[0], best[1])
    return 0


if __name__ == "__main__":
    run_main(main)
