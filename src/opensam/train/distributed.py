"""Data-parallel training under torchrun: the one-process batches, split across ranks.

Each global batch is the one a single process would draw (the loader's own seeded
``BatchSampler``, so the order stays a function of seed and epoch); rank r trains on its share
``batch[r::w]``. A rank whose share is empty (a last batch smaller than w) gets one image with
every label ignored. The loss is the global batch's weighted mean: each rank's NLL sum divided
by the all-reduced weight sum (times w, since the gradients are averaged over the ranks), so
the gradient equals the one-process gradient up to float summation order. The engine
(:mod:`opensam.train.engine`, which says why this is its one mechanism) starts every rank from
rank 0's weights (:func:`broadcast_weights`) and averages the gradients after each backward
(:func:`sync_gradients`); gloo on the CPU, NCCL on CUDA. Rank 0 alone writes checkpoints and
metrics (the caller's guard).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from opensam.constants import IGNORE_INDEX
from opensam.parallel.context import Runtime, all_reduce_sum
from opensam.train.losses import segmentation_loss


class RankBatchSampler(Sampler[list[int]]):
    """This rank's share of every batch of ``inner``; an empty share → ``[-1 - first index]``
    (:class:`RankDataset` serves it with all labels ignored)."""

    def __init__(self, inner: Sampler[list[int]] | BatchSampler, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            share = list(batch[self.rank :: self.world])
            yield share if share else [-1 - int(batch[0])]


class RankDataset(Dataset[dict[str, Any]]):
    """``base`` with negative indices ``-1 - i`` meaning item i with every label 255."""

    def __init__(self, base: Dataset[dict[str, Any]]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index >= 0:
            return self.base[index]
        item = dict(self.base[-1 - index])
        item["label"] = torch.full_like(item["label"], IGNORE_INDEX)
        return item


def distribute_loader(loader: DataLoader, runtime: Runtime) -> DataLoader:
    """``loader`` (shuffled or not) giving this rank its share of each one-process batch."""
    if not runtime.distributed:
        return loader
    return DataLoader(
        RankDataset(loader.dataset),
        batch_sampler=RankBatchSampler(loader.batch_sampler, runtime.rank, runtime.world),  # type: ignore[arg-type]
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,  # the same object the inner sampler draws from
    )


def broadcast_weights(models: Mapping[str, nn.Module], runtime: Runtime) -> None:
    """Copy rank 0's parameters and buffers of each model to every rank (in place)."""
    if not runtime.distributed:
        return
    for model in models.values():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def global_mean_loss(
    log_probs: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    runtime: Runtime,
) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate on this rank, the global batch's weighted-mean NLL), in fp32.

    Backpropagating every rank's loss and averaging the gradients gives the
    gradient of the global batch's weighted mean, as :func:`segmentation_loss` in one process.
    """
    log_probs = log_probs.float()
    total = F.nll_loss(log_probs, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target))
    per_pixel = weight[safe] if weight is not None else torch.ones_like(target, dtype=torch.float)
    parts = torch.stack([total.detach(), (per_pixel * valid).sum().float()])
    parts = all_reduce_sum(parts, runtime)
    if float(parts[1]) <= 0:  # no labelled pixel anywhere in the global batch
        return log_probs.sum() * 0.0, 0.0
    return total * runtime.world / parts[1], float(parts[0] / parts[1])


def sync_gradients(model: nn.Module, runtime: Runtime) -> None:
    """Average the gradients of ``model``'s trainable parameters over the ranks (one flat
    all-reduce, after the backward pass), whatever forward passes the step ran. A parameter
    without a gradient on this rank counts as zero, so every rank reduces the same tensor."""
    if not runtime.distributed:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), runtime)
    flat /= runtime.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def batch_loss(
    log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, runtime: Runtime
) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate, its value): :func:`segmentation_loss` in one process,
    :func:`global_mean_loss` under torchrun; fp32 either way."""
    target = target.to(log_probs.device, non_blocking=True)
    if runtime.distributed:
        return global_mean_loss(log_probs, target, weight, runtime)
    loss = segmentation_loss(log_probs.float(), target, weight)
    return loss, float(loss.detach())
