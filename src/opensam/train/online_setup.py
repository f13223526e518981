"""Building an online run (or its labelled-only control) from ``student`` params: the config,
the weak-view unlabelled loader and the run itself; and the control of either mode (the student
minus the unlabelled data: same init, schedule, augmentation and optimiser steps)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opensam.config import StudentParams
from opensam.data.augment import AugmentConfig, Augmenter
from opensam.data.cutmix import StrongConfig
from opensam.data.datasets import SegDataset, make_loader, make_train_loaders
from opensam.model.segmenter import OpenSamModel, load_checkpoint
from opensam.prepared import Prepared
from opensam.train.engine import TrainConfig, TrainResult
from opensam.train.online import OnlineConfig, train_online
from opensam.train.pseudo_labels import measure_pseudo_quality
from opensam.train.self_training import SelfTrainingInputs, SelfTrainingResult, score_splits
from opensam.train.supervised import train_model

log = logging.getLogger(__name__)

MODES = ("offline", "online")
# the weak view: the same geometric augmentation as the labelled batches, no photometric noise
WEAK = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, blur_prob=0.0)


def online_config(
    params: StudentParams,
    class_weights: Sequence[float] | None,
    seed: int,
    control: bool,
    run_key: str = "",
    pool_labels: bool = False,
) -> OnlineConfig:
    """The run's config; ``control`` sets λ = 0 (labelled only, the same schedule);
    ``run_key`` is the resume fingerprint of the stage's params and inputs; ``pool_labels``:
    the oracle (the pool's true labels in place of the EMA teacher's predictions)."""
    train = TrainConfig.from_params(params, class_weights, seed, run_key)
    return OnlineConfig(
        train=train,
        lam=0.0 if control else params.unsup_weight,
        conf_threshold=params.conf_threshold,
        ema_decay=params.ema_decay,
        feature_dropout=params.feature_dropout,
        strong=StrongConfig(cutmix_prob=params.cutmix_prob),
        perturbation=params.perturbation,
        pool_labels=pool_labels,
    )


def run_online(
    model: OpenSamModel,
    params: StudentParams,
    config: OnlineConfig,
    prepared: Prepared,
    masks: Path,
    pool_ids: Sequence[str],
    checkpoint_dir: Path | None,
    live: Any,
    pool_label_dir: Path | None = None,
) -> TrainResult:
    """Train ``model`` (the warm teacher, loaded with the student's drop path) online.

    The labelled loader is the warm-up's
    (augmented); the unlabelled loader yields weak views of ``pool_ids`` (not built for the
    control), with their labels from ``pool_label_dir/<id>.png`` when given (the oracle).
    Returns the run's result; ``model`` holds the best epoch's EMA teacher."""
    grid = model.grid_hw(prepared.image_size)
    masks_or_none = masks if params.use_masks else None
    seed = config.train.seed
    aug = Augmenter() if params.augment else None
    train, _, val = make_train_loaders(
        prepared.root,
        prepared.train_epoch_ids,
        prepared.val,
        masks_or_none,
        grid,
        params.batch_size,
        seed,
        aug,
        num_workers=params.num_workers,
    )
    unlabelled = None
    if config.lam > 0 and pool_ids:
        weak = Augmenter(WEAK) if params.augment else None
        pool = SegDataset(
            prepared.root,
            pool_ids,
            pool_label_dir,
            masks_or_none,
            grid,
            augment=weak,
            seed=seed + 1,
        )
        unlabelled = make_loader(pool, params.batch_size, True, seed + 1, params.num_workers)
    log.info(
        "online run: %d labelled steps per epoch, %d unlabelled images, λ=%g",
        len(train),
        len(pool_ids) if unlabelled else 0,
        config.lam,
    )
    return train_online(
        model,
        train,
        config,
        unlabelled=unlabelled,
        val_loader=val,
        checkpoint_dir=checkpoint_dir,
        live=live,
    )


def train_control(
    model: OpenSamModel,
    params: StudentParams,
    weights: Sequence[float] | None,
    seed: int,
    prepared: Prepared,
    masks: Path,
    checkpoint_dir: Path | None,
    live: Any,
    run_key: str = "",
) -> tuple[int, float | None]:
    """Train the labelled-only control in place (``model`` is the warm teacher loaded with the
    student's drop path); returns (best epoch, its val mIoU). Online: the online loop with
    λ = 0, so the control is an EMA model too; offline: one round with α = 0. ``run_key``: the
    resume fingerprint of the stage's params and inputs."""
    if params.mode == "online":
        config = online_config(params, weights, seed, control=True, run_key=run_key)
        res = run_online(model, params, config, prepared, masks, [], checkpoint_dir, live)
        return res.best_epoch, res.best_miou
    base = TrainConfig.from_params(params, weights, seed, run_key)
    base = dataclasses.replace(base, alpha_f=0.0)
    train, _, val = make_train_loaders(
        prepared.root,
        prepared.train_epoch_ids,
        prepared.val,
        masks if params.use_masks else None,
        model.grid_hw(prepared.image_size),
        params.batch_size,
        seed,
        Augmenter() if params.augment else None,
        None,
        params.num_workers,
    )
    result = train_model(
        model, train, base, val_loader=val, checkpoint_dir=checkpoint_dir, live=live
    )
    return result.best_epoch, result.best_miou


def run_online_student(
    inputs: SelfTrainingInputs,
    params: StudentParams,
    weights: Sequence[float] | None,
    seed: int,
    checkpoint_dir: Path | None,
    live: Any,
    run_key: str = "",
    pool_labels: Path | None = None,
) -> SelfTrainingResult:
    """``student.mode: online``: one run from the warm teacher; the result holds the best EMA
    teacher and a report (its epoch and val mIoU, the warm teacher's pseudo-label quality, and
    ``best``: val and test mIoU, as the offline rounds report). ``run_key``: the resume
    fingerprint of the stage's params and inputs. ``pool_labels``: a folder of the pool's true
    labels (``<id>.png``): the oracle, whose unlabelled loss learns them instead of the EMA
    teacher's confident predictions (``inputs.pseudo`` is then not read)."""
    model, _ = load_checkpoint(inputs.teacher, drop_path=params.drop_path)
    config = online_config(
        params, weights, seed, control=False, run_key=run_key, pool_labels=pool_labels is not None
    )
    result = run_online(
        model,
        params,
        config,
        inputs.prepared,
        inputs.masks,
        inputs.pool_ids,
        checkpoint_dir,
        live,
        pool_labels,
    )
    quality = None
    if pool_labels is None:
        quality = measure_pseudo_quality(
            inputs.pseudo, inputs.prepared.root, inputs.pool_ids, inputs.classes
        )
    report: dict[str, Any] = {
        "online": {
            "best_epoch": result.best_epoch,
            "val_miou": result.best_miou,
            "warm_teacher_pseudo": quality or {"miou": None},
        },
        "best": {"iter": 1, **score_splits(inputs, model, params, ("val", "test"))},
    }
    return SelfTrainingResult(model, 1, result.best_miou or 0.0, report)
