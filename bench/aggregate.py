"""Mask aggregation per image: naive NU (upsample the map, pool, classify, paint) against ours
(pool weights through the separable adjoint A_hᵀ·mask·A_w, winner index, one gather).

    .venv/bin/python bench/aggregate.py [--quick] [--masks 100] [--threads N]

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

from opensam.aggregation import (
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


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def winner_int64_product(masks: torch.Tensor) -> torch.Tensor:
    """Baseline: max over masks × (index + 1), as int64."""
    ids = torch.arange(1, masks.shape[0] + 1, dtype=torch.int64)[:, None, None]
    return (masks.to(torch.int64) * ids).amax(0) - 1


def winner_flipped_argmax(masks: torch.Tensor) -> torch.Tensor:
    """DESIGN.md's variant: argmax over the flipped uint8 stack finds the last covering mask."""
    flipped = masks.flip(0).view(torch.uint8)
    first = flipped.argmax(0)
    return torch.where(flipped.amax(0) > 0, masks.shape[0] - 1 - first, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 1 min)")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    size, grid, dim = 256, (8, 8), 640
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(1, dim, *grid, generator=gen), dim=1)
    text = F.normalize(torch.randn(4, dim, generator=gen), dim=1)
    masks = make_masks(args.masks, size)
    out_hw = (size, size)

    def ours() -> torch.Tensor:
        inputs = prepare_mask_inputs(masks, grid)
        return aggregate_log_probs(
            emb, text, 100.0, inputs.pool_weights[None], inputs.winner[None], out_hw
        )

    def naive() -> torch.Tensor:
        return aggregate_log_probs_naive(emb, text, 100.0, [masks], out_hw)

    def timed(fn: Callable[[], object]) -> float:
        return time_ms(fn, repeats)

    with torch.no_grad():
        diff = float((ours() - naive()).abs().max())
        inputs = prepare_mask_inputs(masks, grid)
        pool, win = inputs.pool_weights[None], inputs.winner[None]
        rows = [
            ("naive NU (upsample, pool, classify, paint)", timed(naive)),
            ("ours end to end (from the raw masks)", timed(ours)),
            ("  pool weights A_hᵀ·mask·A_w", timed(lambda: nu_pool_weights(masks, grid))),
            ("  winner index (ours: paint, masked_fill_)", timed(lambda: winner_index(masks))),
            (
                "  aggregation given weights + winner",
                timed(lambda: aggregate_log_probs(emb, text, 100.0, pool, win, out_hw)),
            ),
            ("winner: max over int64 product", timed(lambda: winner_int64_product(masks))),
            ("winner: argmax over flipped uint8", timed(lambda: winner_flipped_argmax(masks))),
        ]
    same = torch.equal(winner_int64_product(masks), winner_index(masks)) and torch.equal(
        winner_flipped_argmax(masks), winner_index(masks)
    )
    print(
        f"M={args.masks} masks, D={dim}, {size}x{size} output, {grid[0]}x{grid[1]} embedding, "
        f"{torch.get_num_threads()} thread(s), median of {repeats}"
    )
    print(f"{'path':<46} {'ms':>9}")
    for name, ms in rows:
        print(f"{name:<46} {ms:9.2f}")
    print(f"max |ours - naive| = {diff:.2e}; winner methods agree: {same}")
    print(f"aggregate speedup: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
