"""Mask aggregation per image: naive NU (upsample the map, pool, classify, paint) against ours
(pool weights through the separable adjoint A_hᵀ·mask·A_w, winner index, one gather).

    .venv/bin/python bench/aggregate.py [--quick] [--masks 100] [--threads 1]

Sizes follow DESIGN.md: M masks (default 100) on a 256×256 image, D = 640, an 8×8 embedding,
C = 4 classes, fp32 on the CPU. Ours is timed end to end (pool weights + winner index + aggregation
from the raw masks), and by part. The winner index is also timed three ways. The last line is
``aggregate speedup: N.NNx`` (naive time / our end-to-end time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from opensam.model.aggregation import (
    aggregate_log_probs,
    aggregate_log_probs_naive,
    nu_pool_weights,
    prepare_mask_inputs,
    winner_index,
)


def make_masks(m: int, size: int, seed: int = 0) -> torch.Tensor:
    """(m, size, size) bool ellipses of SAM-like sizes (1%-40% of the image), largest first."""
    gen = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((m, size, size), bool)
    for i in range(m):
        cy, cx = gen.uniform(0, size, 2)
        ry, rx = size * np.sqrt(gen.uniform(0.01, 0.4, 2) / np.pi)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    order = np.argsort(-masks.reshape(m, -1).sum(1), kind="stable")
    return torch.from_numpy(masks[order])


def time_paths(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each path, the paths run round-robin so they share the machine's
    load alike (this 2-core CPU is shared); one warm-up call each."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def winner_int64_product(masks: torch.Tensor) -> torch.Tensor:
    """Baseline: max over masks × (index + 1), as int64."""
    ids = torch.arange(1, masks.shape[0] + 1, dtype=torch.int64)[:, None, None]
    return (masks.to(torch.int64) * ids).amax(0) - 1


def winner_flipped_argmax(masks: torch.Tensor) -> torch.Tensor:
    """DESIGN.md's variant: argmax over the flipped uint8 stack finds the last covering mask."""
    flipped = masks.flip(0).view(torch.uint8)
    first = flipped.argmax(0)
    return torch.where(flipped.amax(0) > 0, masks.shape[0] - 1 - first, -1)


def bench_paths(masks: torch.Tensor, dim: int, grid: tuple[int, int], repeats: int) -> str:
    """Time every path on one image; returns the report (table, checks, speedup line)."""
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(1, dim, *grid, generator=gen), dim=1)
    text = F.normalize(torch.randn(4, dim, generator=gen), dim=1)
    out_hw = (masks.shape[1], masks.shape[2])
    inputs = prepare_mask_inputs(masks, grid)
    pool, win = inputs.pool_weights[None], inputs.winner[None]

    def ours() -> torch.Tensor:
        mi = prepare_mask_inputs(masks, grid)
        return aggregate_log_probs(emb, text, 100.0, mi.pool_weights[None], mi.winner[None], out_hw)

    def naive() -> torch.Tensor:
        return aggregate_log_probs_naive(emb, text, 100.0, [masks], out_hw)

    paths: dict[str, Callable[[], object]] = {
        "naive NU (upsample, pool, classify, paint)": naive,
        "ours end to end (from the raw masks)": ours,
        "  pool weights A_hᵀ·mask·A_w": lambda: nu_pool_weights(masks, grid),
        "  winner index (ours: paint in order, numpy)": lambda: winner_index(masks),
        "  aggregation given weights + winner": lambda: aggregate_log_probs(
            emb, text, 100.0, pool, win, out_hw
        ),
        "winner: max over int64 product": lambda: winner_int64_product(masks),
        "winner: argmax over flipped uint8": lambda: winner_flipped_argmax(masks),
    }
    with torch.no_grad():
        diff = float((ours() - naive()).abs().max())
        ms = time_paths(paths, repeats)
    same = all(
        torch.equal(f(masks), inputs.winner) for f in (winner_int64_product, winner_flipped_argmax)
    )
    lines = [f"{'path':<46} {'ms':>9}"] + [f"{k:<46} {v:9.2f}" for k, v in ms.items()]
    lines.append(f"max |ours - naive| = {diff:.2e}; winner methods agree: {same}")
    speedup = (
        ms["naive NU (upsample, pool, classify, paint)"]
        / ms["ours end to end (from the raw masks)"]
    )
    lines.append(f"aggregate speedup: {speedup:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 1 min)")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: DataLoader workers, where masks are prepared, use one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    repeats = 3 if args.quick else 15
    size, grid, dim = 256, (8, 8), 640
    print(
        f"M={args.masks} masks, D={dim}, {size}x{size} output, {grid[0]}x{grid[1]} embedding, "
        f"{torch.get_num_threads()} thread(s), median of {repeats}"
    )
    print(bench_paths(make_masks(args.masks, size), dim, grid, repeats))


if __name__ == "__main__":
    main()
