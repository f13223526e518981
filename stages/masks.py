"""Stage `masks`: precompute the region masks of every image training will see.

    python stages/masks.py --prepared data/prepared --out data/masks.h5

Reads params `pps`, `min_region_area`, `masks` (generator, max_ratio, compactness), `sam` and
`sam2`; the image size comes from `data/prepared/splits.json`. Masks cover all labelled images
and the first `masks.max_ratio x len(train)` unlabelled ones, so any `ratio <= max_ratio` reuses
them.
Writes `data/masks.h5` (format: `opensam.masks.store`). An interrupted run leaves
`data/.masks.h5.partial`; rerunning with the same settings resumes from it. `--quality` gets the
store's mask quality on the val split (`opensam.eval.mask_quality`: ABO, region-majority
ceiling, masks per image, uncovered share).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opensam.config import load_params
from opensam.eval.mask_quality import store_quality
from opensam.masks.generators import mask_image_ids, precompute_masks
from opensam.masks.store import MaskStore
from opensam.parallel.context import current_runtime, init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import run_main, seed_everything, stage_parser, write_json

SEED = 0  # mask generation draws no random numbers; fixed so the stage needn't read `seed`


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "prepared", "out")
    parser.add_argument("--quality", type=Path, help="mask quality on val (.json) to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(SEED)
    init_runtime(params.runtime)  # sam.device auto follows runtime.device; torchrun shards
    prepared = read_prepared(args.prepared)
    ids = mask_image_ids(prepared, params.masks.max_ratio, str(args.params))
    precompute_masks(  # logs masks per image and bytes per image
        prepared,
        args.out,
        ids,
        pps=params.pps,
        min_region_area=params.min_region_area,
        masks=params.masks,
        sam=params.sam,
        sam2=params.sam2,
        where=str(args.params),
    )
    if args.quality is not None and current_runtime().is_main:
        store = MaskStore(args.out)
        attrs = {k: store.attrs[k] for k in ("generator", "model", "pps", "min_region_area")}
        quality = {"val": store_quality(store, prepared.val, prepared), **attrs}
        store.close()
        write_json(args.quality, quality)
    return 0


if __name__ == "__main__":
    run_main(main)
