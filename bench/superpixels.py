"""SLIC region proposals per image: ours against the straightforward skimage pipeline.

    .venv/bin/python bench/superpixels.py [--quick] [--images 8] [--pps 8 16 32]

Images are procedural demo scenes (``opensam.demo.scene.render_scene``, 1024x683 resized to
256x256).
Both produce the same kind of MaskSet (a partition into ~pps² masks, sorted by area, with xywh
boxes):
- baseline: ``skimage.segmentation.slic`` on the RGB image (skimage's own rgb2lab), one
  ``labels == i`` comparison per mask, boxes from ``skimage.measure.regionprops``;
- ours: ``opensam.masks.superpixels.compute_superpixels`` (OpenCV Lab, slic on it, one scatter for
  all masks, boxes from ``scipy.ndimage.find_objects``).
Times are medians over images, after one warm-up call: wall time and, in brackets, this
process's CPU time (the figure to trust on a machine shared with other jobs). The last line is
``superpixels speedup: N.NNx`` at pps 16 (baseline ms / our ms). ``--quick``: 4 images, pps 16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage.measure import regionprops
from skimage.segmentation import slic

from opensam.demo.dataset import render_scene
from opensam.masks.arrays import MaskSet
from opensam.masks.superpixels import compute_superpixels

SIZE = 256
COMPACTNESS = 10.0


def baseline(image: np.ndarray, pps: int) -> MaskSet:
    labels = slic(image, n_segments=pps * pps, compactness=COMPACTNESS, start_label=0)
    k = int(labels.max()) + 1
    masks = np.stack([labels == i for i in range(k)])
    area = masks.reshape(k, -1).sum(1)
    order = np.argsort(-area, kind="stable")
    boxes = np.zeros((k, 4), np.int32)
    for prop in regionprops(labels + 1):
        y0, x0, y1, x1 = prop.bbox
        boxes[prop.label - 1] = (x0, y0, x1 - x0, y1 - y0)
    ones = np.ones(k, np.float32)
    return MaskSet(masks[order], area[order].astype(np.int32), ones, ones, boxes[order])


def ours(image: np.ndarray, pps: int) -> MaskSet:
    return compute_superpixels(image, pps, COMPACTNESS)


def median_ms(
    fn: Callable[[np.ndarray, int], MaskSet], images: list[np.ndarray], pps: int
) -> tuple[float, float]:
    """Median wall and CPU (this process) milliseconds per image; CPU time is the one to compare
    on a machine shared with other jobs."""
    fn(images[0], pps)  # warm-up
    wall, cpu = [], []
    for image in images:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(image, pps)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images, pps 16")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--pps", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    count, pps_list = (4, [16]) if args.quick else (args.images, sorted(set(args.pps) | {16}))
    images = []
    for i in range(count):
        photo, _ = render_scene(np.random.default_rng(i), 1024, 683)
        images.append(
            np.asarray(Image.fromarray(photo).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
        )
    print(f"{count} demo images at {SIZE}x{SIZE}, compactness {COMPACTNESS}")
    print(
        f"{'pps':>4s} {'masks (ours)':>12s} {'baseline ms (cpu)':>18s} {'ours ms (cpu)':>14s} "
        f"{'speedup':>8s}"
    )
    speedups = {}
    for pps in pps_list:
        base, base_cpu = median_ms(baseline, images, pps)
        mine, mine_cpu = median_ms(ours, images, pps)
        n = statistics.median(len(ours(im, pps)) for im in images)
        speedups[pps] = base / mine
        print(
            f"{pps:4d} {n:12.0f} {base:9.1f} ({base_cpu:5.1f}) {mine:7.1f} ({mine_cpu:5.1f}) "
            f"{base / mine:7.2f}x"
        )
    print(f"superpixels speedup: {speedups[16]:.2f}x")


if __name__ == "__main__":
    main()
