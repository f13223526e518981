"""The one training loop, shared by the teacher warm-up and the student.

AdamW with a per-step cosine learning rate, weighted NLL on the model's aggregated
log-probabilities (255 ignored), an optional pseudo-labelled loader mixed into every step with a
ramped weight α(t), per-epoch DVCLive metrics, a checkpoint per epoch (a killed run resumes from
the last one and ends with the same weights), and the best epoch kept by validation mIoU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from opensam.config import TrainParams
from opensam.data.datasets import Cycler
from opensam.errors import TrainingDiverged
from opensam.eval.evaluation import loader_confusions
from opensam.eval.metrics import confusion_matrix, miou_from_confusion
from opensam.model.aggregation import class_ids
from opensam.model.segmenter import forward_batch
from opensam.parallel.context import all_reduce_sum, current_runtime
from opensam.runtime import save_torch
from opensam.train.distributed import batch_loss, distribute_loader, wrap_ddp
from opensam.train.losses import alpha_ramp, cosine_lr
from opensam.train.reporting import log_history
from opensam.train.resume import (
    check_resume_state,
    plain,
    read_resume_state,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
EpochCallback = Callable[[int, dict[str, Any]], None]  # (epoch 1-based, history entry)


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs; ``class_weights`` None = unweighted, ``alpha_f`` 0 = no pseudo
    loss. ``t1``, ``t2`` are the ramp's start and end as fractions of all steps."""

    epochs: int
    lr_max: float
    lr_min: float
    weight_decay: float
    batch_size: int
    betas: tuple[float, float] = (0.9, 0.999)
    class_weights: tuple[float, ...] | None = None
    use_masks: bool = True
    alpha_f: float = 0.0
    t1: float = 0.2
    t2: float = 0.8
    seed: int = 0
    run_key: str = ""  # resume.run_key: the stage's params and input hashes (the fingerprint)

    @classmethod
    def from_params(
        cls,
        params: TrainParams,
        class_weights: Sequence[float] | None,
        seed: int,
        run_key: str = "",
    ) -> TrainConfig:
        """Build from ``warmup`` (TrainParams) or ``student`` (StudentParams, with the ramp)."""
        names = {f.name for f in fields(cls)} - {"class_weights", "seed", "betas", "run_key"}
        kwargs = {k: getattr(params, k) for k in names if hasattr(params, k)}
        weights = tuple(float(w) for w in class_weights) if class_weights is not None else None
        betas = (float(params.betas[0]), float(params.betas[1]))
        cfg = cls(**kwargs, betas=betas, class_weights=weights, seed=seed, run_key=run_key)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError on values the loop cannot run with."""
        ok = self.epochs >= 1 and self.batch_size >= 1 and 0 <= self.t1 <= self.t2 <= 1
        if not ok or not 0 <= self.lr_min <= self.lr_max or self.lr_max <= 0:
            raise ValueError(
                "need epochs, batch_size >= 1, 0 <= lr_min <= lr_max, lr_max > 0, "
                f"0 <= t1 <= t2 <= 1; got epochs={self.epochs}, batch_size={self.batch_size}, "
                f"lr_min={self.lr_min}, lr_max={self.lr_max}, t1={self.t1}, t2={self.t2}"
            )


@dataclass
class TrainResult:
    """best_epoch is 1-based (the last epoch when there is no validation loader);
    best_miou in percent or None; states are CPU state dicts; history has one dict per epoch."""

    best_epoch: int
    best_miou: float | None
    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def confusion_of(log_probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 confusion (rows GT) of the argmax of log_probs (B, C, H, W) vs target."""
    pred = class_ids(log_probs.detach()).cpu()
    return np.asarray(confusion_matrix(pred, target.cpu(), num_classes), dtype=np.int64)


def evaluate_miou(model: nn.Module, loader: DataLoader, use_masks: bool) -> float:
    """mIoU in percent of ``model`` over ``loader`` (eval mode; training mode is restored).
    Under torchrun each rank scores its own batches and every rank gets the total."""
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        return 0.0
    total = loader_confusions(model, loader, (use_masks,), desc="validate")[use_masks]
    miou = miou_from_confusion(total)
    return 0.0 if math.isnan(miou) else 100.0 * miou  # nothing labelled: 0, never NaN


@dataclass
class _Loop:
    """The mutable state of one run: what a checkpoint holds besides the torch objects."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    steps_per_epoch: int
    weight: torch.Tensor | None
    epoch: int = 0  # next epoch to run, 0-based
    best_epoch: int = 0
    best_miou: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    net: nn.Module | None = None  # what the steps run: the model, or its DDP wrapper
    scaler: Any = None  # torch.amp.GradScaler (enabled for fp16 only)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def _build_loop(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> _Loop:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr_max, betas=config.betas, weight_decay=config.weight_decay
    )
    total = config.epochs * steps_per_epoch
    hi, lo = config.lr_max, config.lr_min  # closed form: the state is just the step count
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: cosine_lr(t, total, hi, lo) / hi
    )
    device = next(model.parameters()).device
    weight = None
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    return _Loop(model, optimizer, scheduler, config, steps_per_epoch, weight)


def _train_step(
    loop: _Loop, batch: Mapping[str, Any], pseudo: Cycler | None, alpha: float
) -> tuple[torch.Tensor, float, float | None]:
    """One optimizer step on a labelled batch (+ α·loss of a pseudo batch when α > 0).

    Returns the labelled batch's log-probabilities (detached) and its / the pseudo loss."""
    cfg, net, rt = loop.config, loop.net or loop.model, current_runtime()
    log_probs = forward_batch(net, batch, cfg.use_masks)
    loss, labelled_loss = batch_loss(log_probs, batch["label"], loop.weight, rt)
    pseudo_loss = None
    if pseudo is not None and alpha > 0:
        pbatch = pseudo.next()
        plog = forward_batch(net, pbatch, cfg.use_masks)
        ploss, pseudo_loss = batch_loss(plog, pbatch["label"], loop.weight, rt)
        loss = loss + alpha * ploss
    loop.optimizer.zero_grad(set_to_none=True)
    scaler = loop.scaler or torch.amp.GradScaler("cpu", enabled=False)
    scaler.scale(loss).backward()
    scaler.step(loop.optimizer)  # a disabled scaler just steps
    scaler.update()
    loop.scheduler.step()
    return log_probs.detach(), labelled_loss, pseudo_loss


def _train_epoch(
    loop: _Loop, train_loader: DataLoader, pseudo_loader: DataLoader | None
) -> dict[str, Any]:
    """One epoch of steps; returns the epoch's history entry (without validation)."""
    cfg = loop.config
    loop.model.train()
    labelled = Cycler(train_loader, cfg.seed, loop.epoch)
    pseudo = Cycler(pseudo_loader, cfg.seed + 1, loop.epoch) if pseudo_loader else None
    total, sup, unsup, conf, alpha = 0.0, 0.0, [], None, 0.0
    steps = range(loop.steps_per_epoch)
    for i in (bar := tqdm(steps, desc=f"epoch {loop.epoch + 1}", unit="step", leave=False)):
        step = loop.epoch * loop.steps_per_epoch + i
        alpha = alpha_ramp(step, loop.total_steps, cfg.alpha_f, cfg.t1, cfg.t2) if pseudo else 0.0
        batch = labelled.next()
        log_probs, loss, ploss = _train_step(loop, batch, pseudo, alpha)
        total, sup = total + loss + alpha * (ploss or 0.0), sup + loss
        unsup += [ploss] if ploss is not None else []
        batch_conf = confusion_of(log_probs, batch["label"], log_probs.shape[1])
        conf = batch_conf if conf is None else conf + batch_conf
        bar.set_postfix(loss=f"{loss:.4f}")
    if conf is not None and current_runtime().distributed:  # the global batches' confusion
        conf = all_reduce_sum(torch.from_numpy(conf)).numpy()
    n = loop.steps_per_epoch
    return {
        "epoch": loop.epoch + 1,
        "train/loss": total / n,  # labelled + α(t)·pseudo
        "train/loss_labelled": sup / n,
        "train/loss_pseudo": sum(unsup) / len(unsup) if unsup else None,
        "train/miou": 100.0 * miou_from_confusion(conf) if conf is not None else 0.0,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "alpha": alpha,
    }


def stop_if_diverged(loss: float, epoch: int) -> None:
    """Raise :class:`TrainingDiverged` when an epoch's loss is NaN or infinite on any rank
    (every rank raises, so none waits for the others), before a checkpoint of it is written."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
    if float(all_reduce_sum(bad)[0]) > 0:
        raise TrainingDiverged(
            f"epoch {epoch}: the training loss is not finite ({loss:g}); lower lr_max or check "
            "the inputs"
        )


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state dict (a best-epoch snapshot)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(loop: _Loop, path: Path) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(loop.config),
        "steps_per_epoch": loop.steps_per_epoch,
        "epoch": loop.epoch,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "rng": rng_state(),
        "best": plain({"epoch": loop.best_epoch, "miou": loop.best_miou, "state": loop.best_state}),
        "history": plain(loop.history),
    }
    save_torch(state, path)


def _try_resume(loop: _Loop, path: Path) -> bool:
    """Restore ``loop`` from ``path`` if it is a checkpoint of the same run; True if resumed."""
    fingerprint = {"format": CHECKPOINT_FORMAT, "config": asdict(loop.config),
                   "steps_per_epoch": loop.steps_per_epoch}  # fmt: skip
    state = read_resume_state(path, fingerprint)
    if state is None:
        return False
    like = loop.model.state_dict()
    weights = {"model": like, **({"best.state": like} if state.get("epoch") else {})}
    problem = check_resume_state(state, weights, loop.optimizer, loop.config.epochs)
    if problem is not None:
        log.warning("%s: unusable checkpoint (%s), starting over", path, problem)
        return False
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    loop.epoch, loop.history = state["epoch"], state["history"]
    best = state["best"]
    loop.best_epoch, loop.best_miou, loop.best_state = best["epoch"], best["miou"], best["state"]
    log.info("resumed from %s after epoch %d", path, loop.epoch)
    return True


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` (warn-only) and restore the old setting."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _seed_run(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _end_epoch(loop: _Loop, entry: dict[str, Any]) -> None:
    """Record the epoch; keep the best state by val mIoU (ties → the earlier epoch)."""
    miou = entry.get("val/miou")
    better = loop.best_state is None or (
        miou is not None and (loop.best_miou is None or miou > loop.best_miou)
    )
    if better or miou is None:  # without validation the last epoch is "best"
        loop.best_epoch, loop.best_miou = entry["epoch"], miou
        loop.best_state = cpu_state(loop.model)
    loop.history.append(entry)
    loop.epoch += 1


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
    """Train ``model`` in place and leave it holding the best epoch's weights.

    train_loader / pseudo_loader yield :func:`opensam.data.datasets.collate_batch` batches (labels
    255 = ignore); with a pseudo loader every step adds α(t)·loss(pseudo batch), and an epoch has
    max(len(train), len(pseudo)) steps (the shorter loader cycles). ``checkpoint_dir`` holds
    ``last.pt``, written after every epoch and resumed from when it matches ``config``. ``live``
    is a DVCLive ``Live`` (or None); a resumed run replays the earlier epochs into it.
    ``on_epoch_end(epoch, entry)`` runs after each epoch's checkpoint is written.
    ``steps_per_epoch`` overrides the steps of an epoch (the student's budget: labelled
    batches, so it does not grow with the pool and its control takes the same steps). History
    entries: epoch, train/loss (labelled + α·pseudo), train/loss_labelled, train/loss_pseudo,
    train/miou (running, over the augmented training batches), lr, alpha, val/miou (percent).
    """
    config.validate()
    rt = current_runtime()  # under torchrun: DDP, each rank its share of every batch
    model.to(rt.device)
    train_loader = distribute_loader(train_loader, rt)
    pseudo_loader = distribute_loader(pseudo_loader, rt) if pseudo_loader else None
    use_pseudo = pseudo_loader is not None and config.alpha_f > 0
    steps = max(len(train_loader), len(pseudo_loader) if use_pseudo and pseudo_loader else 0)
    steps = steps_per_epoch or steps
    loop = _build_loop(model, config, steps)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is None or not _try_resume(loop, ckpt):
        _seed_run(config.seed)
    loop.net, loop.scaler = wrap_ddp(model, rt), rt.grad_scaler()  # after resume: same weights
    if live is not None:
        log_history(live, loop.history)
    with deterministic_algorithms():
        epochs = range(loop.epoch, config.epochs)
        bar = tqdm(epochs, desc="train", unit="epoch", initial=loop.epoch, total=config.epochs)
        for _ in bar:
            entry = _train_epoch(loop, train_loader, pseudo_loader if use_pseudo else None)
            stop_if_diverged(entry["train/loss"], entry["epoch"])
            if val_loader is not None:
                entry["val/miou"] = evaluate_miou(model, val_loader, config.use_masks)
            _end_epoch(loop, entry)
            if live is not None:
                log_history(live, [entry])
            if ckpt is not None and rt.is_main:
                _save_checkpoint(loop, ckpt)
            bar.set_postfix(loss=f"{entry['train/loss']:.4f}", val=entry.get("val/miou"))
            log.info("epoch %s", {k: round(v, 5) if v is not None else v for k, v in entry.items()})
            if on_epoch_end is not None:
                on_epoch_end(entry["epoch"], entry)
    last_state = cpu_state(model)
    assert loop.best_state is not None
    model.load_state_dict(loop.best_state)
    best = (loop.best_epoch, loop.best_miou, loop.best_state)
    return TrainResult(*best, last_state=last_state, history=list(loop.history))
