"""Building an online run (or its labelled-only control) from ``student`` params: the config,
the weak-view unlabelled loader and the run itself (used by the student and control stages)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opensam.augment import AugmentConfig, Augmenter
from opensam.config import StudentParams
from opensam.data.cutmix import StrongConfig
from opensam.datasets import SegDataset, make_loader, make_train_loaders
from opensam.model import OpenSamModel
from opensam.train.online import OnlineConfig, OnlineResult, train_online
from opensam.training import TrainConfig

log = logging.getLogger(__name__)

MODES = ("offline", "online")
# the weak view: the same geometric augmentation as the labelled batches, no photometric noise
WEAK = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, blur_prob=0.0)


def online_config(
    params: StudentParams, class_weights: Sequence[float] | None, seed: int, control: bool
) -> OnlineConfig:
    """The run's config; ``control`` sets λ = 0 (labelled only, the same schedule)."""
    train = TrainConfig.from_params(params, class_weights, seed)
    return OnlineConfig(
        train=train,
        lam=0.0 if control else params.unsup_weight,
        conf_threshold=params.conf_threshold,
        ema_decay=params.ema_decay,
        feature_dropout=params.feature_dropout,
        strong=StrongConfig(cutmix_prob=params.cutmix_prob),
    )


def run_online(
    model: OpenSamModel,
    params: StudentParams,
    config: OnlineConfig,
    data: tuple[Path, Path, dict[str, Any]],
    pool_ids: Sequence[str],
    checkpoint_dir: Path | None,
    live: Any,
) -> OnlineResult:
    """Train ``model`` (the warm teacher, loaded with the student's drop path) online.

    ``data`` is (prepared folder, mask store, splits.json). The labelled loader is the warm-up's
    (augmented); the unlabelled loader yields weak views of ``pool_ids`` (not built for the
    control). Returns the run's result; ``model`` holds the best epoch's EMA teacher."""
    prepared, masks, splits = data
    grid = model.grid_hw(int(splits["image_size"]))
    masks_or_none = masks if params.use_masks else None
    seed = config.train.seed
    aug = Augmenter() if params.augment else None
    train, _, val = make_train_loaders(
        prepared, splits["train"], splits.get("val", []), masks_or_none, grid,
        params.batch_size, seed, aug, num_workers=params.num_workers,
    )  # fmt: skip
    unlabelled = None
    if config.lam > 0 and pool_ids:
        weak = Augmenter(WEAK) if params.augment else None
        pool = SegDataset(
            prepared, pool_ids, None, masks_or_none, grid, augment=weak, seed=seed + 1
        )
        unlabelled = make_loader(pool, params.batch_size, True, seed + 1, params.num_workers)
    log.info("online run: %d labelled steps per epoch, %d unlabelled images, λ=%g",
             len(train), len(pool_ids) if unlabelled else 0, config.lam)  # fmt: skip
    return train_online(model, train, config, unlabelled=unlabelled, val_loader=val,
                        checkpoint_dir=checkpoint_dir, live=live)  # fmt: skip
