"""Stage `ablation_masks`: masks of the zero-shot ablation images for every (pps, area) cell.

    python stages/ablation_masks.py --prepared data/prepared --out data/ablation

Reads params `ablation` (`pps` x `min_region_area`, the grid; `images`, the first that many
train images), `masks`, `sam` and `sam2`. Writes one mask store (format: `opensam.masks.store`)
per cell, `<out>/pps<P>_mra<A>.h5`, and no other file.

One process computes the whole grid: `demo_sam` runs its net and merging once per image and
cuts that hierarchy at every cell (`opensam.masks.boundaries`); SAM runs once per cell, as its
point grid is its input. Finished stores wait in `<out>/../.<out name>.partial/` (with the
partial store of the cell in progress) until the grid is done, then move into `<out>`: DVC
deletes a stage's outputs before it reruns it, so a killed run resumes from there.
"""

from __future__ import annotations

import argparse
import logging
import os

from opensam.config import load_params
from opensam.masks.generators import ablation_image_ids, check_mask_params, precompute_masks
from opensam.parallel.context import barrier, current_runtime, init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import remove_path, run_main, seed_everything, stage_parser

log = logging.getLogger("stages.ablation_masks")
SEED = 0  # mask generation draws no random numbers; fixed so the stage needn't read `seed`


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "prepared", "out").parse_args(argv)


def store_name(pps: int, min_region_area: int) -> str:
    """The file of one cell, the name `zeroshot` reads."""
    return f"pps{pps}_mra{min_region_area}.h5"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(SEED)
    init_runtime(params.runtime)  # sam.device auto follows runtime.device; torchrun shards
    prepared = read_prepared(args.prepared)
    ids = ablation_image_ids(prepared, params.ablation.images, str(args.params))
    cells = [(p, a) for p in params.ablation.pps for a in params.ablation.min_region_area]
    for pps, area in cells:  # every cell's settings, before the first one takes minutes
        where = f"{args.params}: ablation (pps {pps}, min_region_area {area})"
        check_mask_params(pps, area, prepared.image_size, where)
    staging = args.out.parent / f".{args.out.name}.partial"
    for pps, area in cells:
        log.info("cell pps %d, min_region_area %d", pps, area)
        precompute_masks(  # reuses a finished store, resumes a partial one; logs masks per image
            prepared,
            staging / store_name(pps, area),
            ids,
            pps=pps,
            min_region_area=area,
            masks=params.masks,
            sam=params.sam,
            sam2=params.sam2,
            where=f"{args.params}: ablation (pps {pps}, min_region_area {area})",
        )
    if current_runtime().is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        for pps, area in cells:
            os.replace(staging / store_name(pps, area), args.out / store_name(pps, area))
        remove_path(staging)  # this stage's own folder: what is left are other grids' stores
    barrier()
    return 0


if __name__ == "__main__":
    run_main(main)
