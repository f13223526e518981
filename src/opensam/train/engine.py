"""The one training engine: every run (the teacher warm-up, the offline student rounds, the online
student, and the controls of both) is :func:`train` with a *method* plugged in.

The engine owns what all runs share: one state (:class:`Run`), one builder (AdamW with a
per-step cosine learning rate), one epoch loop (labelled batches cycled per epoch, an optional
second loader cycled beside them, the optimiser step, per-epoch means of the step's losses, the
running train mIoU), validation and the best epoch (by val mIoU, ties → the earlier; the last
epoch without validation), DVCLive curves, seeding, one checkpoint per epoch (``last.pt``) and
its exact resume. A method owns one step: the loss of a labelled batch plus whatever it adds
(:class:`opensam.train.supervised.Supervised`: α(t)·a pseudo-labelled batch;
:class:`opensam.train.online.WeakToStrong`: an EMA teacher's confident labels on two strong
views), what follows the optimiser step (the EMA update) and which model is validated and kept.

Checkpoint (format 2, loaded with ``weights_only=True``): ``format``, ``method``, ``config`` (the
method's settings, with :func:`opensam.train.resume.run_key`), ``steps_per_epoch``, ``epoch``,
``models`` (name → state dict: ``model``, or ``student`` and ``teacher``), ``optimizer``,
``scheduler``, ``rng``, ``best`` (epoch, miou, state) and ``history``. It is resumed only when
format, method, config and steps per epoch equal the run's; a format-1 file (the two engines
before this one) starts the run over with a warning.

Processes: under torchrun each rank trains on its share of every one-process batch
(:func:`opensam.train.distributed.distribute_loader`), the losses are normalised by the global
batch, and after each backward the gradients are averaged over the ranks with one all-reduce
(:func:`opensam.train.distributed.sync_gradients`); the start weights are broadcast from rank 0.
This one mechanism rather than a DistributedDataParallel wrapper because a step may run several
forward passes (labelled, strong view, feature-perturbed view) and a second model (the EMA
teacher) before one backward, which an explicit all-reduce handles the same way for every
method, with no wrapper between the step and the model (no ``module.`` names, no rule of one
forward per backward). The price is that the all-reduce does not overlap the backward pass,
small for these models. Rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

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
from opensam.parallel.context import all_reduce_sum, current_runtime
from opensam.runtime import save_torch, seed_rngs
from opensam.train.distributed import broadcast_weights, distribute_loader, sync_gradients
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
CHECKPOINT_FORMAT = 2  # 1: the separate offline and online loops' layouts
EpochCallback = Callable[[int, dict[str, Any]], None]  # (epoch 1-based, history entry)


@dataclass(frozen=True)
class TrainConfig:
    """What every run needs; ``class_weights`` None = unweighted, ``alpha_f`` 0 = no pseudo
    loss (the supervised method). ``t1``, ``t2`` are the ramp's start and end as fractions of
    all steps."""

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
        """Raise ValueError on values the engine cannot run with."""
        ok = self.epochs >= 1 and self.batch_size >= 1 and 0 <= self.t1 <= self.t2 <= 1
        if not ok or not 0 <= self.lr_min <= self.lr_max or self.lr_max <= 0:
            raise ValueError(
                "need epochs, batch_size >= 1, 0 <= lr_min <= lr_max, lr_max > 0, "
                f"0 <= t1 <= t2 <= 1; got epochs={self.epochs}, batch_size={self.batch_size}, "
                f"lr_min={self.lr_min}, lr_max={self.lr_max}, t1={self.t1}, t2={self.t2}"
            )


@dataclass
class TrainResult:
    """best_epoch is 1-based (the last epoch when there is no validation loader); best_miou in
    percent or None; best_state the kept model's (CPU) and last_state the trained model's
    after the last epoch; history has one dict per epoch."""

    best_epoch: int
    best_miou: float | None
    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Step:
    """What a method's step returns: the loss to backpropagate, the labelled batch's
    log-probabilities (detached, for the running train mIoU) and its losses as floats
    (``name -> value``; the epoch reports their means as ``train/<name>``)."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    stats: dict[str, float]


class Method(Protocol):
    """A training method: one step's loss on top of the engine (see the module docstring)."""

    @property
    def name(self) -> str:
        """The method's name (part of the checkpoint's fingerprint)."""
        ...

    @property
    def settings(self) -> Mapping[str, Any]:
        """The method's config as plain values (part of the checkpoint's fingerprint)."""
        ...

    @property
    def keys(self) -> tuple[str, ...]:
        """The stats an epoch reports as ``train/<key>`` (None when no step gave one)."""
        ...

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The models a checkpoint holds (name → module), ``model`` (the trained one) first."""
        ...

    def kept(self, model: nn.Module) -> nn.Module:
        """The model that is validated and kept at the best epoch."""
        ...

    def step(self, run: Run, batch: Mapping[str, Any], extra: Cycler | None, step: int) -> Step:
        """The loss of one labelled ``batch`` (+ batches it draws from ``extra``) at ``step``."""
        ...

    def after_step(self, run: Run, step: int) -> None:
        """Runs after optimiser step ``step`` (0-based)."""
        ...

    def epoch_values(self, run: Run, step: int) -> dict[str, float]:
        """Schedule values of the epoch's last step for its history entry (e.g. ``alpha``)."""
        ...


@dataclass
class Best:
    """The best epoch so far: its number (1-based), val mIoU and a CPU copy of the kept model."""

    epoch: int = 0
    miou: float | None = None
    state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, miou: float | None, model: nn.Module) -> None:
        """Keep ``model`` when ``miou`` beats the best (ties → the earlier epoch), or always
        when there is no validation (the last epoch is the best)."""
        if self.state is None or miou is None or (self.miou is not None and miou > self.miou):
            self.epoch, self.miou, self.state = epoch, miou, cpu_state(model)


@dataclass
class Run:
    """The state of one run: the torch objects and what a checkpoint holds besides them."""

    model: nn.Module  # the model the optimiser trains
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    steps_per_epoch: int
    weight: torch.Tensor | None  # class weights on the model's device
    scaler: torch.amp.GradScaler
    epoch: int = 0  # the next epoch to run, 0-based
    best: Best = field(default_factory=Best)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def build_run(model: nn.Module, method: Method, config: TrainConfig, steps_per_epoch: int) -> Run:
    """A fresh run of ``model``: AdamW on its trainable parameters, the cosine schedule."""
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
    scaler = current_runtime().grad_scaler()
    return Run(model, method, optimizer, scheduler, config, steps_per_epoch, weight, scaler)


def train_step(run: Run, batch: Mapping[str, Any], extra: Cycler | None, step: int) -> Step:
    """The method's step, then one optimiser step (gradients averaged over the ranks)."""
    out = run.method.step(run, batch, extra, step)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out.loss).backward()
    sync_gradients(run.model, current_runtime())  # under torchrun: the ranks' mean
    run.scaler.step(run.optimizer)  # a disabled scaler just steps
    run.scaler.update()
    run.scheduler.step()
    run.method.after_step(run, step)
    return out


def confusion_of(log_probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 confusion (rows GT) of the argmax of log_probs (B, C, H, W) vs target."""
    pred = class_ids(log_probs.detach()).cpu()
    return np.asarray(confusion_matrix(pred, target.cpu(), num_classes), dtype=np.int64)


def train_epoch(run: Run, labelled: DataLoader, extra: DataLoader | None) -> dict[str, Any]:
    """One epoch of steps; returns its history entry (without validation): ``train/loss``
    (the loss backpropagated), ``train/<key>`` for the method's keys, ``train/miou`` (running,
    over the augmented labelled batches), ``lr`` and the method's epoch values."""
    cfg, method = run.config, run.method
    run.model.train()
    lab = Cycler(labelled, cfg.seed, run.epoch)
    ext = Cycler(extra, cfg.seed + 1, run.epoch) if extra is not None else None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    conf: np.ndarray | None = None
    first = run.epoch * run.steps_per_epoch
    steps = range(first, first + run.steps_per_epoch)
    for step in (bar := tqdm(steps, desc=f"epoch {run.epoch + 1}", unit="step", leave=False)):
        batch = lab.next()
        out = train_step(run, batch, ext, step)
        for key, value in {"loss": float(out.loss.detach()), **out.stats}.items():
            sums[key], counts[key] = sums.get(key, 0.0) + value, counts.get(key, 0) + 1
        batch_conf = confusion_of(out.log_probs, batch["label"], out.log_probs.shape[1])
        conf = batch_conf if conf is None else conf + batch_conf
        bar.set_postfix(loss=f"{out.stats.get('loss_labelled', 0.0):.4f}")
    if (rt := current_runtime()).distributed:  # the ranks' mean: a rank's loss is its share's
        keys = sorted(sums)
        total = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), rt)
        sums = {k: float(v) / rt.world for k, v in zip(keys, total, strict=True)}
        if conf is not None:  # the global batches' confusion
            conf = all_reduce_sum(torch.from_numpy(conf)).numpy()
    entry: dict[str, Any] = {"epoch": run.epoch + 1}
    for key in ("loss", *method.keys):
        entry[f"train/{key}"] = sums[key] / counts[key] if counts.get(key) else None
    entry["train/miou"] = 100.0 * miou_from_confusion(conf) if conf is not None else 0.0
    entry["lr"] = run.optimizer.param_groups[0]["lr"]
    return entry | method.epoch_values(run, steps[-1])


def evaluate_miou(model: nn.Module, loader: DataLoader, use_masks: bool) -> float:
    """mIoU in percent of ``model`` over ``loader`` (eval mode; training mode is restored).
    Under torchrun each rank scores its own batches and every rank gets the total."""
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        return 0.0
    total = loader_confusions(model, loader, (use_masks,), desc="validate")[use_masks]
    miou = miou_from_confusion(total)
    return 0.0 if math.isnan(miou) else 100.0 * miou  # nothing labelled: 0, never NaN


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


def _fingerprint(run: Run) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "method": run.method.name,
        "config": run.method.settings,
        "steps_per_epoch": run.steps_per_epoch,
    }


def save_checkpoint(run: Run, path: Path) -> None:
    """Write ``run`` to ``path`` (plain types and tensors only: it loads with weights_only)."""
    models = run.method.models(run.model)
    best = {"epoch": run.best.epoch, "miou": run.best.miou, "state": run.best.state}
    state = {
        **_fingerprint(run),
        "epoch": run.epoch,
        "models": {name: m.state_dict() for name, m in models.items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "best": plain(best),
        "history": plain(run.history),
    }
    save_torch(state, path)


def resume(run: Run, path: Path) -> bool:
    """Restore ``run`` from ``path`` if it is a checkpoint of the same run; True if resumed.
    A checkpoint of another run, another format or with bad contents is left unused (logged)."""
    state = read_resume_state(path, _fingerprint(run))
    if state is None:
        return False
    models = run.method.models(run.model)
    weights = {f"models.{name}": m.state_dict() for name, m in models.items()}
    if state.get("epoch"):
        weights["best.state"] = run.method.kept(run.model).state_dict()
    problem = check_resume_state(state, weights, run.optimizer, run.config.epochs)
    if problem is not None:
        log.warning("%s: unusable checkpoint (%s), starting over", path, problem)
        return False
    for name, m in models.items():
        m.load_state_dict(state["models"][name])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    run.epoch, run.history = state["epoch"], state["history"]
    best = state["best"]
    run.best = Best(best["epoch"], best["miou"], best["state"])
    log.info("resumed from %s after epoch %d", path, run.epoch)
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


def train(
    model: nn.Module,
    method: Method,
    config: TrainConfig,
    labelled: DataLoader,
    *,
    extra: DataLoader | None = None,
    steps_per_epoch: int | None = None,
    val_loader: DataLoader | None = None,
    checkpoint_dir: Path | None = None,
    live: Any = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``method`` and leave it holding the kept model's best
    epoch. ``labelled`` (and ``extra``, the method's second loader: pseudo-labelled or
    unlabelled batches) yield :func:`opensam.data.datasets.collate_batch` batches; an epoch has
    ``steps_per_epoch`` steps (default: the labelled batches), a shorter loader cycles.
    ``checkpoint_dir`` holds ``last.pt``, written after every epoch and resumed from when it
    matches. ``live`` is a DVCLive ``Live`` (or None); a resumed run replays the earlier epochs
    into it. ``on_epoch_end(epoch, entry)`` runs after each epoch's checkpoint is written."""
    config.validate()
    rt = current_runtime()  # under torchrun: each rank its share of every batch
    model.to(rt.device)
    labelled = distribute_loader(labelled, rt)
    extra = distribute_loader(extra, rt) if extra is not None else None
    run = build_run(model, method, config, steps_per_epoch or len(labelled))
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt is None or not resume(run, ckpt):
        seed_rngs(config.seed)
    broadcast_weights(method.models(model), rt)  # every rank starts from rank 0's weights
    if live is not None:
        log_history(live, run.history)
    kept = method.kept(model)
    with deterministic_algorithms():
        epochs = range(run.epoch, config.epochs)
        bar = tqdm(epochs, desc="train", unit="epoch", initial=run.epoch, total=config.epochs)
        for _ in bar:
            entry = train_epoch(run, labelled, extra)
            stop_if_diverged(entry["train/loss"], entry["epoch"])
            if val_loader is not None:
                entry["val/miou"] = evaluate_miou(kept, val_loader, config.use_masks)
            run.best.update(entry["epoch"], entry.get("val/miou"), kept)
            run.history.append(entry)
            run.epoch += 1
            if live is not None:
                log_history(live, [entry])
            if ckpt is not None and rt.is_main:
                save_checkpoint(run, ckpt)
            bar.set_postfix(loss=f"{entry['train/loss']:.4f}", val=entry.get("val/miou"))
            log.info("epoch %s", {k: round(v, 5) if v is not None else v for k, v in entry.items()})
            if on_epoch_end is not None:
                on_epoch_end(entry["epoch"], entry)
    last_state, best = cpu_state(model), run.best
    assert best.state is not None
    model.load_state_dict(best.state)
    return TrainResult(best.epoch, best.miou, best.state, last_state, list(run.history))
