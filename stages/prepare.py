"""Stage `prepare`: import the labelled export and unlabelled photos, downsample, split.

    python stages/prepare.py --out data/prepared --metrics metrics/data.json

Reads params `image_size`, `classes`, `data`. Writes `data/prepared/` (images, labels,
unlabelled_gt, splits.json; see docs/architecture.md) and `metrics/data.json`, both atomically.
Set OPENSAM_WORKERS to change the number of worker processes (default: min(cpus, 4)).
"""

from __future__ import annotations

import argparse
import logging
import os

from opensam.config import load_params
from opensam.data.importers import list_unlabelled, open_export
from opensam.data.prepare import prepare_dataset
from opensam.errors import InputError
from opensam.runtime import atomic_path, run_main, seed_everything, stage_parser, write_json

log = logging.getLogger("stages.prepare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "out", "metrics").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    data = params.data
    seed_everything(data.seed)
    export = open_export(data.source, data.format, params.classes, data.unknown_colour_max_pixels)
    unlabelled = []
    if data.unlabelled is not None:
        taken = [it.id for it in export.items]
        unlabelled = list_unlabelled(data.unlabelled, data.unlabelled_gt, taken)
    workers = int(os.environ.get("OPENSAM_WORKERS", min(os.cpu_count() or 1, 4)))
    try:
        with atomic_path(args.out) as tmp:
            metrics = prepare_dataset(
                export, unlabelled, tmp, params.image_size, data.split, data.seed, workers
            )
    except InputError as exc:
        msg = str(exc)  # split errors name the param; say which params file it came from
        raise InputError(f"{args.params}: {msg}" if msg.startswith("data.split") else msg) from None
    write_json(args.metrics, metrics)
    counts = ", ".join(f"{k} {v['images']}" for k, v in metrics.items())
    log.info("prepared %s (%s)", args.out, counts)
    return 0


if __name__ == "__main__":
    run_main(main)
