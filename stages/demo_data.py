"""Stage demo_data: procedural "Lizards" photos as a CVAT export, plus unlabelled photos.

    python stages/demo_data.py --out data/demo [--params params.yaml]

Reads params ``demo`` (labelled, unlabelled, width, height, seed). Writes ``--out``
atomically: ``labelmap.txt``, ``ImageSets/Segmentation/default.txt``, ``JPEGImages/``,
``SegmentationClass/``, ``unlabelled/`` and ``unlabelled_gt/`` (see ``opensam.demo.dataset``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opensam.config import load_params
from opensam.demo.dataset import generate_demo
from opensam.errors import InputError
from opensam.runtime import run_main, seed_everything

_MIN_SIDE = 32  # smaller photos cannot hold a lizard, a hand and a chart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/demo)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    demo = params.demo
    if demo.labelled < 1 or demo.unlabelled < 0:
        raise InputError(
            f"{args.params}: demo.labelled must be >= 1 and demo.unlabelled >= 0, "
            f"got {demo.labelled} and {demo.unlabelled}"
        )
    if min(demo.width, demo.height) < _MIN_SIDE:
        raise InputError(
            f"{args.params}: demo.width and demo.height must be >= {_MIN_SIDE}, "
            f"got {demo.width}x{demo.height}"
        )
    seed_everything(demo.seed)
    generate_demo(args.out, demo.labelled, demo.unlabelled, demo.seed, demo.width, demo.height)
    return 0


if __name__ == "__main__":
    run_main(main)
