"""The supervised method of the training engine: the teacher warm-up, the offline student rounds
and the offline control.

One step: the weighted NLL of a labelled batch (255 ignored) plus, with a pseudo-labelled loader,
α(t)·the NLL of a pseudo-labelled batch, α ramped from 0 (before ``t1``) to ``alpha_f`` (from
``t2``); the pseudo batch is drawn only when α > 0. Everything else (AdamW, the cosine schedule,
checkpoints and resume, the best epoch) is :mod:`opensam.train.engine`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from opensam.data.datasets import Cycler
from opensam.model.segmenter import forward_batch
from opensam.parallel.context import current_runtime
from opensam.train.distributed import batch_loss
from opensam.train.engine import EpochCallback, Run, Step, TrainConfig, TrainResult, train
from opensam.train.losses import alpha_ramp


class Supervised:
    """Labelled loss + α(t)·pseudo-labelled loss (``pseudo``: a pseudo loader is cycled)."""

    name = "supervised"
    keys = ("loss_labelled", "loss_pseudo")

    def __init__(self, config: TrainConfig, pseudo: bool) -> None:
        self.config, self.pseudo = config, pseudo
        self.settings = dataclasses.asdict(config)

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"model": model}

    def kept(self, model: nn.Module) -> nn.Module:
        return model

    def alpha(self, run: Run, step: int) -> float:
        cfg = self.config
        return (
            alpha_ramp(step, run.total_steps, cfg.alpha_f, cfg.t1, cfg.t2) if self.pseudo else 0.0
        )

    def step(self, run: Run, batch: Mapping[str, Any], extra: Cycler | None, step: int) -> Step:
        use_masks, rt, alpha = self.config.use_masks, current_runtime(), self.alpha(run, step)
        log_probs = forward_batch(run.model, batch, use_masks)
        loss, labelled_loss = batch_loss(log_probs, batch["label"], run.weight, rt)
        stats = {"loss_labelled": labelled_loss}
        if extra is not None and alpha > 0:
            pbatch = extra.next()
            plog = forward_batch(run.model, pbatch, use_masks)
            ploss, stats["loss_pseudo"] = batch_loss(plog, pbatch["label"], run.weight, rt)
            loss = loss + alpha * ploss
        return Step(loss, log_probs.detach(), stats)

    def after_step(self, run: Run, step: int) -> None:
        pass

    def epoch_values(self, run: Run, step: int) -> dict[str, float]:
        return {"alpha": self.alpha(run, step)}


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    val_loader: DataLoader | None = None,
    pseudo_loader: DataLoader | None = None,
    checkpoint_dir: Path | None = None,
    live: Any = None,
    on_epoch_end: EpochCallback | None = None,
    steps_per_epoch: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with :class:`Supervised` and leave it holding the best epoch's
    weights (:func:`opensam.train.engine.train`).

    With a pseudo loader (and ``alpha_f`` > 0) an epoch has max(len(train), len(pseudo)) steps
    (the shorter loader cycles), unless ``steps_per_epoch`` sets them (the student's budget:
    labelled batches, so it does not grow with the pool and its control takes the same steps).
    History entries: epoch, train/loss (labelled + α·pseudo), train/loss_labelled,
    train/loss_pseudo (None before α > 0), train/miou (running, over the augmented training
    batches), lr, alpha, val/miou (percent)."""
    pseudo = pseudo_loader if pseudo_loader is not None and config.alpha_f > 0 else None
    steps = steps_per_epoch or max(len(train_loader), len(pseudo) if pseudo is not None else 0)
    method = Supervised(config, pseudo is not None)
    return train(
        model,
        method,
        config,
        train_loader,
        extra=pseudo,
        steps_per_epoch=steps,
        val_loader=val_loader,
        checkpoint_dir=checkpoint_dir,
        live=live,
        on_epoch_end=on_epoch_end,
    )
