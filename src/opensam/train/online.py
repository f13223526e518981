"""Online weak-to-strong self-training with an EMA teacher (``student.mode: online``).

Every step takes a labelled batch and an unlabelled batch (weak view: geometric augmentation
only). The EMA teacher labels the weak view with region aggregation over the masks; pixels whose
max probability is below ``conf_threshold`` are ignored. The student learns those labels on two
strong views: photometric noise + CutMix (masks, winner map and pool weights built from both
sources, :mod:`opensam.data.cutmix`), and channel dropout on the dense embedding of the weak
view (UniMatch's feature perturbation); with ``perturbation: complementary``, two CutMix views
whose embeddings keep complementary channels instead (UniMatch V2; the second view's loss is
reported as ``loss_feature``). Loss = labelled CE + λ·(½ CE_strong + ½ CE_feature),
the unlabelled terms averaged over all pixels (unconfident ones count as 0). After each
optimiser step the teacher becomes ``d·teacher + (1 − d)·student`` with
``d = min(1 − 1/(step + 1), ema_decay)``.
With ``pool_labels`` (the ``oracle`` stage) the unlabelled batches carry the pool's true labels
and they replace the EMA teacher's predictions (every labelled pixel counts as confident).

The step budget is ``epochs × len(labelled loader)``: independent of the ratio, so the
labelled-only control (λ = 0, no unlabelled loader) takes the same steps, schedule, init and
augmentation. The EMA teacher is the model that is validated, kept (best val epoch) and returned.
A checkpoint per epoch holds both models, the optimiser, the scheduler and the RNG states; a
killed run resumes from it and ends with the same weights. The feature-perturbed view is the
model's own forward pass with ``feature_dropout`` (:meth:`OpenSamModel.embed`), so it runs in
the same precision as the other views.

Under torchrun every rank takes its share of each one-process batch (labelled and unlabelled);
the losses are normalised by the global batch (pixel counts all-reduced) and the engine averages
the gradients, so the student, and with it the EMA teacher, stay identical on every rank.
CutMix pairs images within a rank's share, so two processes do not reproduce the one-process
run exactly. Everything but the step (optimiser, schedule, checkpoints, resume, the best epoch)
is :mod:`opensam.train.engine`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from opensam.constants import IGNORE_INDEX
from opensam.data.cutmix import MixedBatch, StrongConfig, strong_view
from opensam.data.datasets import Cycler
from opensam.model.segmenter import embedding_channels, forward_batch
from opensam.parallel.context import Runtime, all_reduce_sum, current_runtime
from opensam.train.distributed import batch_loss
from opensam.train.engine import EpochCallback, Run, Step, TrainConfig, TrainResult, train


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
    # dropout: a CutMix view + a channel-dropout view of the weak one (UniMatch);
    # complementary: two CutMix views, channels kept by a random mask and by its complement
    # (UniMatch V2; the mask keeps a channel with probability 1 − feature_dropout)
    perturbation: str = "dropout"
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


def complementary_channels(
    batch: int, channels: int, cfg: OnlineConfig, rng: np.random.Generator
) -> torch.Tensor:
    """(batch, channels) float mask of 0 and 1 for the first strong view, each channel kept with
    probability 1 − ``feature_dropout``; the second view takes ``1 − mask`` (UniMatch V2's
    complementary channel dropout), so each channel reaches exactly one of the two views."""
    keep = rng.random((batch, channels)) >= cfg.feature_dropout
    return torch.from_numpy(keep.astype(np.float32))


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


class WeakToStrong:
    """The online method: the student learns the labelled batch and the EMA teacher's confident
    labels on two strong views of an unlabelled batch (``unlabelled``: one is cycled)."""

    name = "weak-to-strong"

    def __init__(self, model: nn.Module, config: OnlineConfig, unlabelled: bool) -> None:
        self.config, self.settings = config, asdict(config)
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        unsup = ("loss_unlabelled", "loss_strong", "loss_feature", "confident")
        self.keys = ("loss_labelled", *(unsup if unlabelled else ()))

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"student": model, "teacher": self.teacher}

    def kept(self, model: nn.Module) -> nn.Module:
        return self.teacher

    def step(self, run: Run, batch: Mapping[str, Any], extra: Cycler | None, step: int) -> Step:
        """Labelled CE + λ·(½ CE(strong CutMix view) + ½ CE(feature-dropout view)), both on the
        teacher's labels of the weak view, unconfident pixels counting as 0; with
        ``perturbation: complementary`` the second term is a second CutMix view, and the two
        views' embeddings keep complementary channels."""
        cfg, rt = self.config, current_runtime()
        student, use_masks, threshold = run.model, cfg.train.use_masks, cfg.conf_threshold
        ubatch = extra.next() if extra is not None else None
        logp = forward_batch(student, batch, use_masks)
        loss, labelled_loss = batch_loss(logp, batch["label"], run.weight, rt)
        stats = {"loss_labelled": labelled_loss}
        if ubatch is None:  # the labelled-only control
            return Step(loss, logp.detach(), stats)
        with torch.no_grad():  # the EMA teacher labels the weak view
            if cfg.pool_labels:  # the oracle: the pool's true labels (255 stays ignored)
                label = ubatch["label"].to(logp.device)
                conf = torch.ones(label.shape, dtype=torch.float32, device=logp.device)
            else:
                conf, label = forward_batch(self.teacher, ubatch, use_masks).exp().max(dim=1)
        rank = [rt.rank] if rt.distributed else []
        rng = np.random.default_rng([cfg.train.seed, 7, step, *rank])
        views = (ubatch["image"], ubatch["winner"], ubatch["pool_weights"], label.cpu(), conf.cpu())
        mixed = strong_view(*views, cfg.strong, rng)
        if cfg.perturbation == "complementary":  # UniMatch V2: two views, complementary channels
            keep = complementary_channels(len(label), embedding_channels(student), cfg, rng)
            second = strong_view(*views, cfg.strong, rng)
            loss_s, confident = self._view_loss(student, mixed, keep)
            loss_fp, _ = self._view_loss(student, second, 1 - keep)
        else:  # UniMatch: a CutMix view and a channel-dropout view of the weak one
            loss_s, confident = self._view_loss(student, mixed)
            feature = forward_batch(student, ubatch, use_masks, feature_dropout=cfg.feature_dropout)
            loss_fp, _ = confident_loss(feature, label, conf, threshold, rt)
        unlabelled = 0.5 * (loss_s + loss_fp)
        stats |= {
            "loss_unlabelled": float(unlabelled.detach()),
            "loss_strong": float(loss_s.detach()),
            "loss_feature": float(loss_fp.detach()),
            "confident": confident,
        }
        return Step(loss + cfg.lam * unlabelled, logp.detach(), stats)

    def _view_loss(
        self, student: nn.Module, view: MixedBatch, channel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """The confident loss of ``student`` on a strong view against its mixed labels."""
        cfg = self.config
        batch = {"image": view.image, "pool_weights": view.pool_weights, "winner": view.winner}
        logp = forward_batch(student, batch, cfg.train.use_masks, channel_mask=channel_mask)
        label, conf = view.label.to(logp.device), view.conf.to(logp.device)
        return confident_loss(logp, label, conf, cfg.conf_threshold, current_runtime())

    def after_step(self, run: Run, step: int) -> None:
        ema_update(self.teacher, run.model, ema_decay_at(step, self.config.ema_decay))

    def epoch_values(self, run: Run, step: int) -> dict[str, float]:
        return {}


def train_online(
    model: nn.Module,
    labelled: DataLoader,
    config: OnlineConfig,
    *,
    unlabelled: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    checkpoint_dir: Path | None = None,
    live: Any = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` (the student, initialised from the warm teacher) with
    :class:`WeakToStrong` for ``epochs × len(labelled)`` steps and leave it holding the best
    epoch's EMA-teacher weights. ``unlabelled`` yields weak views (labels unused); without it
    (or with λ = 0) this is the labelled-only control with the same schedule. History keys:
    train/loss, train/loss_labelled, train/loss_unlabelled, train/loss_strong,
    train/loss_feature, train/confident (share of confident pixels), train/miou, lr,
    val/miou."""
    model.to(current_runtime().device)  # before the teacher is copied from it
    unl = unlabelled if unlabelled is not None and config.lam > 0 else None
    method = WeakToStrong(model, config, unl is not None)
    return train(
        model,
        method,
        config.train,
        labelled,
        extra=unl,
        val_loader=val_loader,
        checkpoint_dir=checkpoint_dir,
        live=live,
        on_epoch_end=on_epoch_end,
    )
