"""The masks stage's worker threads: a whole mask store with ``masks.workers`` = N against 1.

    .venv/bin/python bench/mask_workers.py [--images 60] [--pps 16 64] [--workers 2] [--quick]

Images are procedural demo scenes (``opensam.demo.scene.render_scene``, 1024x683 resized to
256x256), written as a prepared data set in a temporary folder. Each pps writes two stores through
``opensam.masks.generators.precompute_masks`` (superpixels): the baseline with one thread (the
stage before ``masks.workers``), ours with ``--workers`` threads, side by side in this run. It
checks that every per-image dataset is byte-identical, then prints wall seconds per store and the
ratio. The last line is ``mask workers speedup: N.NNx`` at pps 16. ``--quick``: 12 images, pps 16.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
from PIL import Image

from opensam.config import MasksParams, SamParams
from opensam.demo.scene import render_scene
from opensam.masks.generators import precompute_masks
from opensam.prepared import read_prepared

SIZE = 256


def write_prepared(root: Path, count: int) -> list[str]:
    (root / "images").mkdir(parents=True)
    ids = [f"im{i:03d}" for i in range(count)]
    for i, image_id in enumerate(ids):
        photo, _ = render_scene(np.random.default_rng(i), 1024, 683)
        small = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        Image.fromarray(small).save(root / "images" / f"{image_id}.png")
    splits = {
        "image_size": SIZE,
        "classes": ["a", "b"],
        "train": ids,
        "val": [],
        "test": [],
        "unlabelled": [],
    }
    (root / "splits.json").write_text(json.dumps(splits))
    return ids


def datasets(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {
            f"{i}/{k}": np.asarray(d[()]).tobytes()
            for i, g in f["images"].items()
            for k, d in g.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--pps", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="12 images, pps 16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    count, pps_list = (12, [16]) if args.quick else (args.images, sorted(set(args.pps) | {16}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = write_prepared(root / "prepared", count)
        prepared = read_prepared(root / "prepared")
        ratio = {}
        for pps in pps_list:
            wall, stores = {}, {}
            for workers in (1, args.workers):  # baseline first, then ours, in one process
                out = root / f"pps{pps}_w{workers}.h5"
                masks = MasksParams(generator="superpixels", workers=workers)
                t0 = time.perf_counter()
                precompute_masks(prepared, out, ids, pps, 0, masks, SamParams())
                wall[workers] = time.perf_counter() - t0
                stores[workers] = datasets(out)
            if stores[1] != stores[args.workers]:
                raise SystemExit(f"pps {pps}: the stores differ")
            ratio[pps] = wall[1] / wall[args.workers]
            print(
                f"pps {pps}, {count} images: 1 thread {wall[1]:.2f} s, {args.workers} threads "
                f"{wall[args.workers]:.2f} s, {ratio[pps]:.2f}x, datasets identical"
            )
    print(f"mask workers speedup: {ratio[16]:.2f}x")


if __name__ == "__main__":
    main()
