"""Stage `ablation_masks`: masks of the zero-shot ablation images for one (pps, area) cell.

    python stages/ablation_masks.py --prepared data/prepared --pps 16 --min-region-area 0 \
        --out data/ablation/pps16_mra0.h5

Reads params `ablation.images` (the first that many train images), `masks`, `sam` and `sam2`;
`pps` and the minimum region area come from the command line (dvc.yaml's matrix over
`ablation.pps` x `ablation.min_region_area`). Writes one mask store (format:
`opensam.masks.store`), resumable like the `masks` stage.
"""

from __future__ import annotations

import argparse

from opensam.config import load_params
from opensam.masks.generators import ablation_image_ids, precompute_masks
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import run_main, seed_everything, stage_parser

SEED = 0  # mask generation draws no random numbers; fixed so the stage needn't read `seed`


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "prepared", "out")
    parser.add_argument("--pps", type=int, required=True, help="points per side")
    parser.add_argument("--min-region-area", type=int, required=True, help="pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(SEED)
    init_runtime(params.runtime)  # sam.device auto follows runtime.device; torchrun shards
    prepared = read_prepared(args.prepared)
    ids = ablation_image_ids(prepared, params.ablation.images, str(args.params))
    precompute_masks(  # logs masks per image and bytes per image
        prepared,
        args.out,
        ids,
        pps=args.pps,
        min_region_area=args.min_region_area,
        masks=params.masks,
        sam=params.sam,
        sam2=params.sam2,
        where=f"{args.params} / --pps {args.pps} --min-region-area {args.min_region_area}",
    )
    return 0


if __name__ == "__main__":
    run_main(main)
