"""Per-image work split across torchrun ranks by whole batches, and put back in order.

Rank r of w takes the batches b = r, r + w, r + 2w, ... of the one-process batching of an
unshuffled loader. Every batch therefore holds the same images as in one process, so its
results (and any float sum over it) are the same, and gathering the per-batch results by b
restores the one-process order exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from torch.utils.data import DataLoader

from opensam.parallel.context import Runtime, all_gather_objects, current_runtime

T = TypeVar("T")


def own_batches(n: int, batch_size: int, runtime: Runtime | None = None) -> list[list[int]]:
    """Index lists of this rank's batches of ``range(n)`` cut into ``batch_size`` chunks."""
    rt = runtime or current_runtime()
    count = math.ceil(n / max(1, batch_size))
    return [
        list(range(b * batch_size, min(n, (b + 1) * batch_size)))
        for b in range(rt.rank, count, rt.world)
    ]


def own_batch_numbers(n: int, batch_size: int, runtime: Runtime | None = None) -> list[int]:
    """The global numbers b of :func:`own_batches`."""
    rt = runtime or current_runtime()
    return list(range(rt.rank, math.ceil(n / max(1, batch_size)), rt.world))


def shard_loader(
    loader: DataLoader, runtime: Runtime | None = None, skip: Sequence[int] = ()
) -> tuple[DataLoader, list[int]]:
    """This rank's batches of an unshuffled ``loader`` (all of them in one process), minus the
    batch numbers in ``skip``, and their global batch numbers."""
    rt = runtime or current_runtime()
    batch_size = int(loader.batch_size or 1)
    n = len(loader.dataset)  # type: ignore[arg-type]
    numbers = own_batch_numbers(n, batch_size, rt)
    batches = own_batches(n, batch_size, rt)
    if not rt.distributed and not skip:
        return loader, numbers
    keep = [(b, idx) for b, idx in zip(numbers, batches, strict=True) if b not in set(skip)]
    sharded = DataLoader(
        loader.dataset,
        batch_sampler=[idx for _, idx in keep],
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
    return sharded, [b for b, _ in keep]


def gather_in_order(pairs: list[tuple[int, T]], runtime: Runtime | None = None) -> list[T]:
    """Every rank's ``(key, value)`` pairs, values sorted by key, on every rank."""
    merged = [p for part in all_gather_objects(pairs, runtime) for p in part]
    return [value for _, value in sorted(merged, key=lambda p: p[0])]


def sum_over_ranks(
    confusion: dict[bool, np.ndarray], runtime: Runtime | None = None
) -> dict[bool, np.ndarray]:
    """``{key: sum over ranks}`` of per-rank confusion matrices (exact: int64 sums)."""
    out: dict[bool, np.ndarray] = {}
    for part in all_gather_objects(confusion, runtime):
        for key, value in part.items():
            out[key] = out[key] + value if key in out else value
    return out
