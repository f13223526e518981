"""Mask inputs of a geometrically augmented item: ours against moving the whole mask stack.

    .venv/bin/python bench/augmented_masks.py [--quick] [--images 8] [--size 256] [--pps 16]

After a flip / crop / rotation the pool weights (M, h, w) and the winner (H, W) of the *moved*
masks are needed. Masks are disjoint here, like the demo's superpixels (a Voronoi partition into
pps² cells, M ≈ 256 at pps 16), on an 8×8 embedding grid (opensam-tiny or convnext_base_w at
256 px). Both paths give the same result (winner exactly, weights to ~1e-7):
- baseline: ``opensam.data.augment.warp_masks`` (nearest-sample the (M, H, W) stack) then
  ``opensam.model.aggregation.prepare_mask_inputs`` (the separable NU adjoint + winner argmax);
- ours (``SegDataset``'s path for disjoint masks): move only the stored winner map
  (``warp_label``) and pool with ``opensam.data.datasets.pool_weights_from_winner``.
Times are medians over images after a warm-up, one thread: wall and, in brackets, this
process's CPU time (the one to trust on a shared machine). The last line is
``augmented_masks speedup: N.NNx`` (baseline CPU ms / our CPU ms). ``--quick``: 4 images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from opensam.data.augment import Augmenter, warp_label, warp_masks
from opensam.data.datasets import pool_weights_from_winner
from opensam.model.aggregation import prepare_mask_inputs, winner_index

GRID = (8, 8)
Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # masks, stored winner, source index
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def voronoi_masks(size: int, pps: int, seed: int) -> torch.Tensor:
    """(M, size, size) bool disjoint cells of pps² random seeds, largest first."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    best, cells = np.full((size, size), np.inf), np.zeros((size, size), np.int64)
    for i, (y, x) in enumerate(rng.uniform(0, size, (pps * pps, 2))):
        d = (yy - y) ** 2 + (xx - x) ** 2
        cells[d < best], best = i, np.minimum(best, d)
    stack = torch.from_numpy(np.stack([cells == i for i in np.unique(cells)]))
    return stack[torch.argsort(stack.flatten(1).sum(1), descending=True, stable=True)]


def baseline(masks: torch.Tensor, winner: torch.Tensor, index: torch.Tensor) -> tuple:
    inputs = prepare_mask_inputs(warp_masks(masks, index), GRID)
    return inputs.pool_weights, inputs.winner


def ours(masks: torch.Tensor, winner: torch.Tensor, index: torch.Tensor) -> tuple:
    moved = warp_label(winner, index, fill=-1)
    return pool_weights_from_winner(moved, masks.shape[0], GRID), moved


def median_ms(fn: Fn, cases: list[Case]) -> tuple[float, float]:
    """Median wall and CPU milliseconds per image, after one warm-up call."""
    fn(*cases[0])
    wall, cpu = [], []
    for case in cases:
        w0, c0 = time.perf_counter(), time.process_time()
        fn(*case)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pps", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases: list[Case] = []
    for seed in range(4 if args.quick else args.images):
        masks = voronoi_masks(args.size, args.pps, seed)
        index = Augmenter()(
            torch.zeros(3, args.size, args.size), None, None, np.random.default_rng(seed)
        ).source_index
        assert index is not None
        cases.append((masks, winner_index(masks), index))
    err = 0.0
    for case in cases:
        (wa, ia), (wb, ib) = baseline(*case), ours(*case)
        assert torch.equal(ia, ib), "winners differ"
        err = max(err, float((wa - wb).abs().max()))
    rows = {
        "baseline: warp_masks + prepare_mask_inputs": median_ms(baseline, cases),
        "ours: warp winner + pool_weights_from_winner": median_ms(ours, cases),
    }
    m = cases[0][0].shape[0]
    print(
        f"{len(cases)} images {args.size}², M={m} disjoint masks, grid {GRID}, "
        f"max |Δ pool weight| {err:.1e}"
    )
    print(f"{'path':<48}{'wall ms':>9}{'(cpu ms)':>11}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:<48}{wall:>9.1f}{f'({cpu:.1f})':>11}")
    base, our = (cpu for _, cpu in rows.values())
    print(f"augmented_masks speedup: {base / our:.2f}x")


if __name__ == "__main__":
    main()
