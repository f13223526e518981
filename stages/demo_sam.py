"""Stage `demo_sam`: pretrain the demo's SAM stand-in on generated scenes with object masks.

    python stages/demo_sam.py --out models/demo_sam.pt --metrics metrics/demo_sam.json \
        --live metrics/live/demo_sam

Params: ``image_size``, ``demo.width``, ``demo.height``, ``demo_sam.*``. Draws
``demo_sam.scenes`` scenes with the demo generator under the corpus's own seed
(``demo_sam.seed``; never the demo photos, their labels or ``unlabelled_gt``), and trains a
small class-agnostic boundary U-Net from random init on their object and part borders
(:mod:`opensam.demo.boundaries`), the stand-in for SAM's SA-1B.
Writes the checkpoint that ``masks.generator: demo_sam`` reads (``masks.checkpoint``). The
metrics hold the held-out quality of its masks at pps 8, 16, 32 and 64 on
``demo_sam.heldout_scenes`` further scenes (ABO of their objects, masks per image) and the final
loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np

from opensam.config import load_params
from opensam.demo.boundaries import (
    BoundaryConfig,
    border_target,
    pretrain_boundaries,
    render_boundary_corpus,
)
from opensam.demo.scene import PARTS
from opensam.errors import InputError
from opensam.eval.mask_quality import mask_quality
from opensam.masks.boundaries import (
    BoundaryNet,
    predict_boundaries,
    regions_from_boundaries,
    save_boundary_net,
)
from opensam.runtime import run_main, save_torch, seed_everything, stage_parser, write_json

log = logging.getLogger("stages.demo_sam")
HELDOUT_PPS = (8, 16, 32, 64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "out", "metrics", "live").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    ds = params.demo_sam
    if min(ds.scenes, ds.heldout_scenes, ds.steps, ds.batch_size, ds.width, ds.workers) < 1:
        raise InputError(
            f"{args.params}: demo_sam needs scenes, heldout_scenes, steps, "
            "batch_size, width and workers >= 1"
        )
    if not 16 <= ds.crop_size <= params.image_size or ds.crop_size % 16:
        raise InputError(
            f"{args.params}: demo_sam.crop_size must be a multiple of 16 in "
            f"16..image_size ({params.image_size}), got {ds.crop_size}"
        )
    seed_everything(ds.seed)
    fields = {f.name for f in dataclasses.fields(BoundaryConfig)}
    cfg = BoundaryConfig(**{k: v for k, v in dataclasses.asdict(ds).items() if k in fields})
    start = time.monotonic()
    hw = (round(ds.render_width * params.demo.height / params.demo.width), ds.render_width)
    images, segments = render_boundary_corpus(
        ds.seed, ds.scenes + ds.heldout_scenes, params.image_size, ds.workers, 0, hw
    )
    targets = np.stack([border_target(s) for s in segments[: ds.scenes]])
    log.info("%d + %d scenes in %.0f s", ds.scenes, ds.heldout_scenes, time.monotonic() - start)

    from dvclive import Live  # heavy import, only where the curve is written

    net = BoundaryNet(ds.width)
    with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=False) as live:

        def on_step(step: int, loss: float) -> None:
            live.step = step
            live.log_metric("train/loss", loss)
            live.next_step()

        losses = pretrain_boundaries(net, images[: ds.scenes], targets, cfg, on_step)
    net.eval()
    objects = (segments[ds.scenes :] // PARTS).astype(np.uint8)  # class-agnostic: object ids
    boundaries = predict_boundaries(net, images[ds.scenes :])
    held = {}
    for pps in HELDOUT_PPS:
        pairs = zip(
            (regions_from_boundaries(b, pps).masks for b in boundaries), objects, strict=True
        )
        quality = mask_quality(pairs, int(objects.max()) + 1)
        held[f"pps{pps}"] = {k: quality[k] for k in ("abo", "masks_per_image", "segments")}
    meta = {"seed": ds.seed, "scenes": ds.scenes, "steps": ds.steps}
    save_torch(save_boundary_net(net, meta), args.out)
    metrics = {
        "heldout": held,
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    write_json(args.metrics, metrics)
    log.info("demo SAM in %.0f s: %s", time.monotonic() - start, metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
