"""Stage `student`: self-training rounds with pseudo-labels (thesis Experiment 3).

    python stages/student.py --prepared data/prepared --masks data/masks.h5 \
        --data-metrics metrics/data.json --teacher models/teacher.pt --pseudo data/pseudo \
        --out models/student.pt --metrics metrics/student.json --live metrics/live/student

Params: ``seed``, ``ratio``, ``student.*``, ``pseudo.*``. ``student.mode: online`` trains one
weak-to-strong student with an EMA teacher instead (:mod:`opensam.train.online`; ``--pseudo``
then only gives the warm teacher's pseudo-label quality). ``offline``: round r trains a noisy
student that starts from the warm teacher, on labelled + pseudo-labelled batches (loss
weight α(t) ramped).
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

from opensam.augment import Augmenter
from opensam.config import ClipParams, Params, StudentParams, load_params
from opensam.datasets import make_train_loaders
from opensam.errors import InputError
from opensam.evaluation import load_splits
from opensam.model import OpenSamModel, load_checkpoint, save_checkpoint
from opensam.pseudo_labels import (
    generate_pseudo_labels,
    load_pseudo_ids,
    measure_pseudo_quality,
    select_pool_ids,
)
from opensam.runtime import atomic_path, remove_path, run_main, seed_everything
from opensam.train.online_setup import MODES, online_config, run_online
from opensam.training import (
    TrainConfig,
    evaluate_splits,
    open_live,
    resolve_class_weights,
    train_model,
)

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
    with atomic_path(out) as tmp:
        summary = generate_pseudo_labels(
            teacher, args.prepared, ids, args.masks, tmp, conf, batch, class_names=names
        )
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
                checkpoint_dir=ckpt_dir, live=live, steps_per_epoch=len(train))  # fmt: skip
    return model


def train_online_student(
    args: argparse.Namespace, params: Params, weights: list[float], pool_ids: list[str],
    splits: dict[str, Any], classes: list[str],
) -> tuple[OpenSamModel, dict[str, Any]]:  # fmt: skip
    """``student.mode: online``: one run from the warm teacher; returns the best EMA teacher
    and its report (val / train per the best epoch, the pool's pseudo-label quality)."""
    cfg = params.student
    try:
        config = online_config(cfg, weights, params.seed + 1, control=False)
    except ValueError as exc:
        raise InputError(f"{args.params}: student: {exc}") from None
    model, _ = load_checkpoint(args.teacher, drop_path=cfg.drop_path)
    ckpt, live = args.out.parent / ".student_ckpt" / "online", open_live(args.live)
    data = (args.prepared, args.masks, splits)
    result = run_online(model, cfg, config, data, pool_ids, ckpt, live)
    live.end()
    quality = measure_pseudo_quality(args.pseudo, args.prepared, pool_ids, classes)
    report = {"online": {"best_epoch": result.best_epoch, "val_miou": result.best_miou,
                         "warm_teacher_pseudo": quality or {"miou": None}}}  # fmt: skip
    return model, report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    cfg, splits = params.student, load_splits(args.prepared)
    if cfg.iterations < 1:
        raise InputError(f"{args.params}: student.iterations must be >= 1")
    if cfg.mode not in MODES:
        raise InputError(f"{args.params}: student.mode must be one of {', '.join(MODES)}")
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
    if cfg.mode == "online":
        model, online = train_online_student(args, params, weights, pool_ids, splits, classes)
        scores = score(model, split_ids={s: splits.get(s, []) for s in ("val", "test")})
        online["best"] = {"iter": 1, **scores}
        write_student(args, model, meta, online, 1, online["online"]["val_miou"] or 0.0)
        return 0
    ckpt_root, live = args.out.parent / ".student_ckpt", open_live(args.live)
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
    live.end()
    assert best is not None
    model.load_state_dict(best[2])
    test = score(model, split_ids={"test": splits.get("test", [])})
    report["best"] = {"iter": best[0], "val": report[f"iter{best[0]}"].get("val"), **test}
    write_student(args, model, meta, report, best[0], best[1])
    return 0


def write_student(
    args: argparse.Namespace, model: OpenSamModel, meta: dict[str, Any], report: dict[str, Any],
    iteration: int, val_miou: float,
) -> None:  # fmt: skip
    """Save the student checkpoint and metrics, then drop the resume checkpoints."""
    clip, classes = ClipParams(**meta["clip"]), list(meta["classes"])
    save_checkpoint(args.out, model, classes, clip, int(meta["image_size"]), iteration=iteration,
                    val_miou=val_miou)  # fmt: skip
    with atomic_path(args.metrics) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    remove_path(args.out.parent / ".student_ckpt")
    log.info("student: best round %d, val mIoU %.2f", iteration, val_miou)


if __name__ == "__main__":
    run_main(main)
