"""Online weak-to-strong self-training with an EMA teacher (``student.mode: online``).

Every step takes a labelled batch and an unlabelled batch (weak view: geometric augmentation
only). The EMA teacher labels the weak view with region aggregation over the masks; pixels whose
max probability is below ``conf_threshold`` are ignored. The student learns those labels on two
strong views: photometric noise + CutMix (masks, winner map and pool weights built from both
sources, :mod:`opensam.data.cutmix`), and channel dropout on the dense embedding of the weak
view (UniMatch's feature perturbation). Loss = labelled CE + λ·(½ CE_strong + ½ CE_feature),
the unlabelled terms averaged over all pixels (unconfident ones count as 0). After each
optimiser step the teacher becomes ``d·teacher + (1 − d)·student`` with
``d = min(1 − 1/(step + 1), ema_decay)``.
With ``pool_labels`` (the ``oracle`` stage) the unlabelled batches carry the pool's true labels
and they replace the EMA teacher's predictions (every labelled pixel counts as confident).

The step budget is ``epochs × len(labelled loader)``: independent of the ratio, so the
labelled-only control (λ = 0, no unlabelled loader) takes the same steps, schedule, init and
augmentation. The EMA teacher is the model that is validated, kept (best val epoch) and returned.
A checkpoint per epoch holds both models, the optimiser, the scheduler and the RNG states; a
killed run resumes from it and ends with the same weights.

Under torchrun every rank takes its share of each one-process batch (labelled and unlabelled,
:func:`opensam.train.distributed.distribute_loader`), the losses are normalised by the global
batch (pixel counts all-reduced) and the gradients are averaged over the ranks before each step
(:func:`opensam.train.distributed.sync_gradients`), so the student, and with it the EMA teacher,
stay identical on every rank. CutMix pairs images within a rank's share, so two processes do not
reproduce the one-process run exactly; rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from opensam.constants import IGNORE_INDEX
from opensam.data.cutmix import StrongConfig, strong_view
from opensam.data.datasets import Cycler
from opensam.model.segmenter import OpenSamModel, forward_batch
from opensam.parallel.context import Runtime, all_reduce_sum, current_runtime
from opensam.runtime import save_torch
from opensam.train.distributed import batch_loss, distribute_loader, sync_gradients
from opensam.train.loop import (
    TrainConfig,
    cpu_state,
    deterministic_algorithms,
    evaluate_miou,
    stop_if_diverged,
)
from opensam.train.losses import cosine_lr
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


@dataclass(frozen=True)
class OnlineConfig:
    """The shared schedule (``train``: epochs, lrs, batch size, class weights, seed) plus the
    online knobs: λ (``lam``), the confidence threshold, the EMA decay, the feature-dropout
    rate and the strong-view strengths."""

    train: TrainConfig
    lam: float = 1.0
    conf_threshold: float = 0.95
    ema_decay: float = 0.99
    feature_dropout: float = 0.5
    strong: StrongConfig = field(default_factory=StrongConfig)
    # the oracle: the unlabelled batches carry the pool's true labels, used (every pixel
    # confident) in place of the EMA teacher's predictions; the rest of the run is unchanged
    pool_labels: bool = False


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student for parameters; buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def ema_decay_at(step: int, ema_decay: float) -> float:
    """The decay used after optimiser step ``step`` (0-based): a warm start, then ``ema_decay``."""
    return min(1.0 - 1.0 / (step + 2), ema_decay)


def confident_loss(
    log_probs: torch.Tensor,
    label: torch.Tensor,
    conf: torch.Tensor,
    threshold: float,
    runtime: Runtime | None = None,
) -> tuple[torch.Tensor, float]:
    """Mean NLL over all pixels of (B, C, H, W) log-probs vs pseudo-labels (B, H, W), where
    pixels with ``conf < threshold`` (or label 255) count as 0. Returns (loss, confident share).

    Under torchrun (``runtime.distributed``) the mean is over the global batch: the returned
    loss is this rank's NLL sum × world / all pixels of all ranks (the ranks' gradients are
    averaged), and the confident share is the global one."""
    keep = (conf >= threshold) & (label != IGNORE_INDEX)
    target = torch.where(keep, label, torch.full_like(label, IGNORE_INDEX))
    nll = F.nll_loss(log_probs.float(), target, ignore_index=IGNORE_INDEX, reduction="none").sum()
    if runtime is None or not runtime.distributed:
        return nll / max(1, label.numel()), float(keep.float().mean())
    counts = torch.tensor([float(keep.sum()), float(label.numel())], dtype=torch.float64)
    counts = all_reduce_sum(counts, runtime)
    total = max(1.0, float(counts[1]))
    return nll * runtime.world / total, float(counts[0]) / total


def dropout_log_probs(
    model: OpenSamModel, batch: Mapping[str, Any], p: float, use_masks: bool
) -> torch.Tensor:
    """Log-probs of ``batch`` with channel dropout (rate ``p``) on the dense embedding, before
    its L2 normalisation (the feature-perturbed strong view)."""
    device = next(model.parameters()).device
    images = batch["image"].to(device)
    x = (images - model.mean) / model.std
    emb = F.normalize(F.dropout2d(model.decoder(model.tower(x)), p, training=True), dim=1)
    pool = batch["pool_weights"].to(device) if use_masks else None
    winner = batch["winner"].to(device) if use_masks else None
    return model.log_probs(emb, (images.shape[-2], images.shape[-1]), pool, winner)


@dataclass
class _State:
    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: OnlineConfig
    steps_per_epoch: int
    weight: torch.Tensor | None
    epoch: int = 0
    best_epoch: int = 0
    best_miou: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    scaler: Any = None  # torch.amp.GradScaler (enabled for fp16 only)


def _build(model: nn.Module, config: OnlineConfig, steps_per_epoch: int) -> _State:
    tc = config.train
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=tc.lr_max, betas=tc.betas, weight_decay=tc.weight_decay,
    )  # fmt: skip
    total, hi, lo = tc.epochs * steps_per_epoch, tc.lr_max, tc.lr_min
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: cosine_lr(t, total, hi, lo) / hi
    )
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    weight = None
    if tc.class_weights is not None:
        weight = torch.tensor(tc.class_weights, dtype=torch.float32, device=device)
    return _State(model, teacher, optimizer, scheduler, config, steps_per_epoch, weight)


def _unlabelled_loss(
    st: _State, ubatch: Mapping[str, Any], step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """λ-free unlabelled loss of one batch: ½ CE(strong CutMix view) + ½ CE(feature dropout)."""
    cfg, use_masks = st.config, st.config.train.use_masks
    with torch.no_grad():
        if cfg.pool_labels:  # the oracle: the true labels (255 stays ignored)
            device = next(st.teacher.parameters()).device
            label = ubatch["label"].to(device)
            conf = torch.ones(label.shape, dtype=torch.float32, device=device)
        else:
            conf, label = forward_batch(st.teacher, ubatch, use_masks).exp().max(dim=1)
    rt = current_runtime()
    rng = np.random.default_rng([cfg.train.seed, 7, step] + ([rt.rank] if rt.distributed else []))
    mixed = strong_view(ubatch["image"], ubatch["winner"], ubatch["pool_weights"],
                        label.cpu(), conf.cpu(), cfg.strong, rng)  # fmt: skip
    strong = {"image": mixed.image, "pool_weights": mixed.pool_weights, "winner": mixed.winner}
    device = label.device
    loss_s, frac = confident_loss(forward_batch(st.student, strong, use_masks),
                                  mixed.label.to(device), mixed.conf.to(device),
                                  cfg.conf_threshold, rt)  # fmt: skip
    fp = dropout_log_probs(cast(OpenSamModel, st.student), ubatch, cfg.feature_dropout, use_masks)
    loss_fp, _ = confident_loss(fp, label, conf, cfg.conf_threshold, rt)
    stats = {"loss_strong": float(loss_s.detach()), "loss_feature": float(loss_fp.detach()),
             "confident": frac}  # fmt: skip
    return 0.5 * (loss_s + loss_fp), stats


def _step(
    st: _State, batch: Mapping[str, Any], ubatch: Mapping[str, Any] | None, step: int
) -> dict[str, float]:
    """One optimiser step and EMA update; returns the step's losses."""
    tc, rt = st.config.train, current_runtime()
    logp = forward_batch(st.student, batch, tc.use_masks)
    loss, labelled_loss = batch_loss(logp, batch["label"], st.weight, rt)
    stats = {"loss_labelled": labelled_loss}
    if ubatch is not None:
        uloss, ustats = _unlabelled_loss(st, ubatch, step)
        loss = loss + st.config.lam * uloss
        stats |= {"loss_unlabelled": float(uloss.detach()), **ustats}
    st.optimizer.zero_grad(set_to_none=True)
    scaler = st.scaler or torch.amp.GradScaler("cpu", enabled=False)
    scaler.scale(loss).backward()
    sync_gradients(st.student, rt)  # under torchrun: the ranks' mean, as DDP would
    scaler.step(st.optimizer)  # a disabled scaler just steps
    scaler.update()
    st.scheduler.step()
    ema_update(st.teacher, st.student, ema_decay_at(step, st.config.ema_decay))
    stats["loss"] = float(loss.detach())
    return stats


def _epoch(st: _State, labelled: DataLoader, unlabelled: DataLoader | None) -> dict[str, Any]:
    seed = st.config.train.seed
    st.student.train()
    lab = Cycler(labelled, seed, st.epoch)
    unl = Cycler(unlabelled, seed + 1, st.epoch) if unlabelled is not None else None
    sums: dict[str, float] = {}
    for i in tqdm(range(st.steps_per_epoch), desc=f"epoch {st.epoch + 1}", leave=False):
        step = st.epoch * st.steps_per_epoch + i
        stats = _step(st, lab.next(), unl.next() if unl is not None else None, step)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    if (rt := current_runtime()).distributed:  # the rank mean of the scaled losses: the global one
        keys = sorted(sums)
        mean = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), rt)
        sums = {k: float(v) / rt.world for k, v in zip(keys, mean, strict=True)}
    entry: dict[str, Any] = {"epoch": st.epoch + 1}
    entry |= {f"train/{k}": v / st.steps_per_epoch for k, v in sums.items()}
    entry["lr"] = st.optimizer.param_groups[0]["lr"]
    return entry


def _save(st: _State, path: Path) -> None:
    state = {
        "format": CHECKPOINT_FORMAT, "config": asdict(st.config),
        "steps_per_epoch": st.steps_per_epoch, "epoch": st.epoch,
        "student": st.student.state_dict(), "teacher": st.teacher.state_dict(),
        "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
        "rng": rng_state(),  # tensors and plain types: the file loads with weights_only=True
        "best": {"epoch": st.best_epoch, "miou": st.best_miou, "state": st.best_state},
        "history": plain(st.history),
    }  # fmt: skip
    save_torch(state, path)


def _resume(st: _State, path: Path) -> bool:
    """Restore ``st`` from ``path`` when it is a checkpoint of the same run."""
    fingerprint = {"format": CHECKPOINT_FORMAT, "config": asdict(st.config),
                   "steps_per_epoch": st.steps_per_epoch}  # fmt: skip
    state = read_resume_state(path, fingerprint)
    if state is None:
        return False
    like = st.student.state_dict()
    weights = {"student": like, "teacher": st.teacher.state_dict()}
    if state.get("epoch"):
        weights["best.state"] = st.teacher.state_dict()
    problem = check_resume_state(state, weights, st.optimizer, st.config.train.epochs)
    if problem is not None:
        log.warning("%s: unusable checkpoint (%s), starting over", path, problem)
        return False
    st.student.load_state_dict(state["student"])
    st.teacher.load_state_dict(state["teacher"])
    st.optimizer.load_state_dict(state["optimizer"])
    st.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    st.epoch, st.history = state["epoch"], state["history"]
    best = state["best"]
    st.best_epoch, st.best_miou, st.best_state = best["epoch"], best["miou"], best["state"]
    log.info("resumed from %s after epoch %d", path, st.epoch)
    return True


def _finish_epoch(st: _State, entry: dict[str, Any]) -> None:
    """Record the epoch and keep the EMA teacher of the best val epoch (ties: the earlier)."""
    miou = entry.get("val/miou")
    if st.best_state is None or miou is None or (st.best_miou is not None and miou > st.best_miou):
        st.best_epoch, st.best_miou, st.best_state = entry["epoch"], miou, cpu_state(st.teacher)
    st.history.append(entry)
    st.epoch += 1


@dataclass
class OnlineResult:
    """best_epoch 1-based; best_miou (val, percent) or None; history one entry per epoch."""

    best_epoch: int
    best_miou: float | None
    history: list[dict[str, Any]]


def train_online(
    model: nn.Module,
    labelled: DataLoader,
    config: OnlineConfig,
    *,
    unlabelled: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    checkpoint_dir: Path | None = None,
    live: Any = None,
) -> OnlineResult:
    """Train ``model`` (the student, initialised from the warm teacher) and leave it holding the
    best epoch's EMA-teacher weights. ``unlabelled`` yields weak views (labels unused);
    without it (or with λ = 0) this is the labelled-only control with the same schedule.
    History keys: train/loss, train/loss_labelled, train/loss_unlabelled, train/loss_strong,
    train/loss_feature, train/confident (share of confident pixels), lr, val/miou."""
    config.train.validate()
    rt = current_runtime()  # under torchrun: each rank its share of every batch, rank 0 writes
    model.to(rt.device)
    labelled = distribute_loader(labelled, rt)
    unl = distribute_loader(unlabelled, rt) if unlabelled is not None and config.lam > 0 else None
    st = _build(model, config, len(labelled))
    st.scaler = rt.grad_scaler()
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is None or not _resume(st, ckpt):
        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed % 2**32)
        random.seed(config.train.seed)
    if live is not None:
        log_history(live, st.history)
    with deterministic_algorithms():
        for _ in range(st.epoch, config.train.epochs):
            entry = _epoch(st, labelled, unl)
            stop_if_diverged(entry["train/loss"], entry["epoch"])
            if val_loader is not None:
                entry["val/miou"] = evaluate_miou(st.teacher, val_loader, config.train.use_masks)
            _finish_epoch(st, entry)
            if live is not None:
                log_history(live, [entry])
            if ckpt is not None and rt.is_main:
                _save(st, ckpt)
            log.info("epoch %s", {k: round(v, 4) for k, v in entry.items()})
    assert st.best_state is not None
    model.load_state_dict(st.best_state)
    return OnlineResult(st.best_epoch, st.best_miou, list(st.history))
