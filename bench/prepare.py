"""Benchmark the `prepare` stage: ours (JPEG DCT-scaled decoding + a process pool) against the
obvious baseline (full-size decode, one process), on synthetic photos of the demo's shape.

    python bench/prepare.py            # 78 labelled + 480 unlabelled 1024x683 JPEGs (the demo)
    python bench/prepare.py --quick    # 10 + 40

Prints a table (seconds, images/s) and the mean absolute difference of our prepared images from
the baseline's (0..255 scale), then `prepare speedup: N.NNx` (baseline time / our time).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from opensam.config import ClassSpec, SplitParams
from opensam.dataset_io import list_unlabelled, open_export, write_cvat_export

NAMES = ["lizard", "hand", "color board", "background"]
COLOURS = [(250, 220, 40), (40, 200, 60), (40, 90, 230), (0, 0, 0)]


def _photo(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like (h, w, 3) uint8 image (smooth shading, texture, edges) and its class map."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.full((h, w), 3, np.uint8)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    label[((yy - cy) / (0.2 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < 1] = 0
    label[int(0.7 * h) :, : int(0.3 * w)] = 1
    label[: int(0.25 * h), int(0.75 * w) :] = 2
    base = np.array(COLOURS, np.float32)[label] * 0.6 + 60
    shade = 0.8 + 0.2 * np.sin(xx / rng.uniform(40, 90)) * np.cos(yy / rng.uniform(40, 90))
    grid = ((xx % 40 < 1) | (yy % 40 < 1)) * -40.0  # millimetre-paper lines
    noise = rng.normal(0, 8, (h, w, 1)).astype(np.float32)
    photo = base * shade[..., None] + grid[..., None] + noise
    return np.clip(photo, 0, 255).astype(np.uint8), label


def make_data(root: Path, n_labelled: int, n_unlabelled: int, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    items = [(f"l{i:03d}", *_photo(rng, h, w)) for i in range(n_labelled)]
    write_cvat_export(root / "export", NAMES, COLOURS, items)
    (root / "unlabelled").mkdir()
    for i in range(n_unlabelled):
        Image.fromarray(_photo(rng, h, w)[0]).save(root / f"unlabelled/u{i:03d}.jpg", quality=90)


def run_once(
    root: Path, out: Path, workers: int, reduced: bool, size: int, n_labelled: int
) -> float:
    from opensam.prepare import prepare_dataset

    classes = [ClassSpec(n, n) for n in NAMES]
    start = time.perf_counter()
    export = open_export(root / "export", "cvat", classes)
    pool = list_unlabelled(root / "unlabelled", None, [it.id for it in export.items])
    split = SplitParams(n_labelled - 2 * (n_labelled // 8), n_labelled // 8, n_labelled // 8)
    prepare_dataset(export, pool, out, size, split, 0, workers=workers, reduced_decode=reduced)
    return time.perf_counter() - start


def mean_abs_diff(a: Path, b: Path) -> float:
    diffs = [
        np.abs(np.asarray(Image.open(p), np.float64) - np.asarray(Image.open(b / p.name))).mean()
        for p in sorted(a.glob("*.png"))
    ]
    return float(np.mean(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare: draft + pool vs full decode, 1 process")
    parser.add_argument("--quick", action="store_true", help="10 + 40 images")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_l, n_u = (10, 40) if args.quick else (78, 480)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(root, n_l, n_u, 683, 1024)
        print(f"generated {n_l} + {n_u} photos 1024x683 in {time.perf_counter() - t0:.1f} s")
        runs = [("baseline: full decode, 1 process", 1, False),
                ("draft decode, 1 process", 1, True),
                (f"ours: draft decode, {args.workers} processes", args.workers, True)]  # fmt: skip
        times = {}
        for name, workers, reduced in runs:
            times[name] = run_once(root, root / name[:4], workers, reduced, args.size, n_l)
        n = n_l + n_u
        diff = mean_abs_diff(root / "ours/images", root / "base/images")
        print(f"\n| variant | seconds | images/s |\n|---|---|---|")
        for name, seconds in times.items():
            print(f"| {name} | {seconds:.2f} | {n / seconds:.1f} |")
        print(f"\nmean |ours - baseline| per pixel: {diff:.3f} (0..255)")
        base, ours = times[runs[0][0]], times[runs[-1][0]]
        print(f"prepare speedup: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
