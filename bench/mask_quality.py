"""Mask quality of every CPU generator on one prepared split, side by side from one run.

    .venv/bin/python bench/mask_quality.py [--prepared data/prepared] [--split val]
        [--checkpoint models/demo_sam.pt] [--pps 8 16 32 64] [--gt]

For each generator (superpixels, regions, demo_sam) and each pps, the masks of every image of the
split are computed in memory and scored with :mod:`opensam.eval.mask_quality` against the split's
labels: ABO, region-majority ceiling mIoU, masks per image, uncovered share, and seconds per
image. ``--gt`` adds the upper bound: the labels' own class components as masks. The last line is
``demo_sam ABO at pps 16: X (superpixels: Y, ratio Z)``. Run ``dvc repro prepare demo_sam`` first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from opensam.config import MasksParams, SamParams
from opensam.eval.mask_quality import label_segments, mask_quality
from opensam.images import read_label_png
from opensam.masks.generators import build_generator
from opensam.masks.workers import read_prepared_image
from opensam.prepared import read_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", default="models/demo_sam.pt")
    parser.add_argument("--pps", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--generators", nargs="+", default=["superpixels", "regions", "demo_sam"])
    parser.add_argument("--gt", action="store_true", help="also score the labels' components")
    args = parser.parse_args()
    prepared = read_prepared(args.prepared)
    size = prepared.image_size
    ids = prepared.ids(args.split)
    images = [read_prepared_image(prepared.image_path(i), size) for i in ids]
    labels = [read_label_png(prepared.label_path(i), (size, size)) for i in ids]
    n = len(prepared.classes)
    print(f"{len(ids)} {args.split} images, {size}x{size}")
    print("| generator | pps | ABO | ceiling mIoU | masks / image | uncovered % | s / image |")
    print("|---|---|---|---|---|---|---|")
    abo: dict[tuple[str, int], float] = {}
    for name in args.generators:
        for pps in args.pps:
            masks = MasksParams(generator=name, checkpoint=args.checkpoint)
            gen = build_generator(name, pps, 0, masks, SamParams(), size)
            start = time.perf_counter()
            sets = [gen.generate(image).masks for image in images]
            per = (time.perf_counter() - start) / len(ids)
            q = mask_quality(zip(sets, labels, strict=True), n)
            abo[name, pps] = q["abo"]
            print(
                f"| {name} | {pps} | {q['abo']:.3f} | {q['ceiling_miou']:.2f} | "
                f"{q['masks_per_image']:.1f} | {100 * q['uncovered']:.2f} | {per:.3f} |",
                flush=True,
            )
    if args.gt:

        def components(label: np.ndarray) -> np.ndarray:
            segs = sorted(label_segments(label, 1), key=lambda m: -int(m.sum()))
            return np.stack(segs) if segs else np.zeros((0, *label.shape), bool)

        q = mask_quality(((components(lab), lab) for lab in labels), n)
        print(
            f"| ground-truth components | - | {q['abo']:.3f} | {q['ceiling_miou']:.2f} | "
            f"{q['masks_per_image']:.1f} | {100 * q['uncovered']:.2f} | - |"
        )
    if ("demo_sam", 16) in abo and ("superpixels", 16) in abo:
        ours, base = abo["demo_sam", 16], abo["superpixels", 16]
        print(
            f"demo_sam ABO at pps 16: {ours:.3f} (superpixels: {base:.3f}, "
            f"ratio {ours / max(base, 1e-9):.2f})"
        )


if __name__ == "__main__":
    main()
