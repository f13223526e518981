"""Benchmark the `prepare` stage's image work: ours (JPEG DCT-scaled decoding, colour lookup by
compares on packed RGBX codes, zlib level 1 PNGs, a process pool) against the obvious baseline
(full decode, int64 colour codes + searchsorted, default PNGs, one process), on synthetic photos
of the demo's shape. Both write the same files; ours also does the splits and statistics.

    python bench/prepare.py            # 78 labelled + 480 unlabelled 1024x683 JPEGs (the demo)
    python bench/prepare.py --quick    # 10 + 40

Prints a table (wall and CPU seconds, images/s) and the mean absolute difference of our prepared
images from the baseline's (0..255 scale), then `prepare speedup: N.NNx` (baseline wall time /
our wall time with --workers processes).
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from opensam.config import ClassSpec, SplitParams
from opensam.data.cvat import write_cvat_export
from opensam.data.importers import list_unlabelled, open_export
from opensam.data.prepare import prepare_dataset

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
    """A CVAT export and an unlabelled folder; 16 distinct scenes, copied (decode cost is same)."""
    rng = np.random.default_rng(0)
    scenes = [_photo(rng, h, w) for _ in range(16)]
    items = [(f"l{i:03d}", *scenes[i % 16]) for i in range(n_labelled)]
    write_cvat_export(root / "export", NAMES, COLOURS, items)
    (root / "unlabelled").mkdir()
    for k, (photo, _) in enumerate(scenes):
        Image.fromarray(photo).save(root / f"unlabelled/u{k:03d}.jpg", quality=90)
    for i in range(16, n_unlabelled):
        data = (root / f"unlabelled/u{i % 16:03d}.jpg").read_bytes()
        (root / f"unlabelled/u{i:03d}.jpg").write_bytes(data)


def naive_prepare(root: Path, out: Path, size: int) -> None:
    """The obvious baseline: full decode, numpy colour lookup, default PNG, one process."""
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in COLOURS])
    order = np.argsort(codes)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for photo in sorted((root / "export/JPEGImages").iterdir()) + sorted(
        (root / "unlabelled").iterdir()
    ):
        img = ImageOps.exif_transpose(Image.open(photo).convert("RGB"))
        img.resize((size, size), Image.Resampling.LANCZOS).save(out / f"images/{photo.stem}.png")
        label_path = root / f"export/SegmentationClass/{photo.stem}.png"
        if label_path.exists():
            rgb = np.asarray(Image.open(label_path).convert("RGB")).astype(np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            pos = np.searchsorted(codes[order], code)
            ids = order[np.minimum(pos, len(codes) - 1)].astype(np.uint8)
            small = Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST)
            small.save(out / f"labels/{photo.stem}.png")


def ours_prepare(root: Path, out: Path, size: int, workers: int, n_labelled: int) -> None:
    classes = [ClassSpec(n, n) for n in NAMES]
    export = open_export(root / "export", "cvat", classes)
    pool = list_unlabelled(root / "unlabelled", None, [it.id for it in export.items])
    split = SplitParams(n_labelled - 2 * (n_labelled // 8), n_labelled // 8, n_labelled // 8)
    prepare_dataset(export, pool, out, size, split, 0, workers=workers)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""

    def cpu() -> float:
        own, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, start = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - start


def mean_abs_diff(a: Path, b: Path) -> float:
    diffs = [
        np.abs(np.asarray(Image.open(p), np.float64) - np.asarray(Image.open(b / p.name))).mean()
        for p in sorted(a.glob("*.png"))
    ]
    return float(np.mean(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare: ours vs the obvious baseline")
    parser.add_argument("--quick", action="store_true", help="10 + 40 images, one repeat")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (the CPU is shared)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_l, n_u = (10, 40) if args.quick else (78, 480)
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, n_l, n_u, 683, 1024)
        runs: dict[str, Callable[[Path], None]] = {
            "baseline: full decode, numpy lookup, 1 process": lambda o: naive_prepare(
                root, o, args.size
            ),
            "ours, 1 process": lambda o: ours_prepare(root, o, args.size, 1, n_l),
            f"ours, {args.workers} processes": lambda o: ours_prepare(
                root, o, args.size, args.workers, n_l
            ),
        }
        best: dict[str, tuple[float, float]] = {}
        for r in range(repeats):
            for k, (name, fn) in enumerate(runs.items()):
                out = root / f"out{k}_{r}"
                t = timed(lambda fn=fn, out=out: fn(out))
                best[name] = min(best.get(name, t), t)
        n = n_l + n_u
        print(f"\n{n_l} + {n_u} photos 1024x683 -> {args.size}^2, best of {repeats}")
        print("| variant | wall s | CPU s | images/s |\n|---|---|---|---|")
        for name, (wall, cpu) in best.items():
            print(f"| {name} | {wall:.2f} | {cpu:.2f} | {n / wall:.1f} |")
        diff = mean_abs_diff(root / "out2_0/images", root / "out0_0/images")
        print(f"\nmean |ours - baseline| per pixel of the prepared images: {diff:.3f} (0..255)")

        def label(p: Path) -> np.ndarray:
            return np.asarray(Image.open(p))

        base_labels = root / "out0_0/labels"
        same = all(
            np.array_equal(label(p), label(base_labels / p.name))
            for p in sorted((root / "out2_0/labels").glob("*.png"))
        )
        print(f"prepared labels identical to the baseline's: {same}")
        names = list(runs)
        print(f"prepare speedup: {best[names[0]][0] / best[names[-1]][0]:.2f}x")


if __name__ == "__main__":
    main()
