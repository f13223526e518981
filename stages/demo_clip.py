"""Stage `demo_clip`: pretrain the demo's tiny open_clip model on generated image-caption pairs.

    python stages/demo_clip.py --out models/demo_clip.pt --metrics metrics/demo_clip.json \
        --live metrics/live/demo_clip

Params: ``image_size``, ``demo``, ``clip.model``, ``demo_clip.*``. Draws
``demo_clip.scenes`` scenes with the demo generator under the corpus's own seed
(``demo_clip.seed``; never the demo photos), trains ``clip.model`` from random init with
open_clip's ``ClipLoss`` on random crops and their captions (no pixel labels reach the loss), and
writes a plain open_clip state_dict to ``--out`` (``clip.pretrained: models/demo_clip.pt``). The
metrics hold the zero-shot accuracy on single-object crops of ``demo_clip.heldout_scenes``
further scenes, per class, and the final loss; the loss curve goes to DVCLive ``--live``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np

from opensam.config import load_params
from opensam.demo.captions import CLASS_PROMPTS, render_corpus
from opensam.demo.pretrain import (
    PretrainConfig,
    heldout_crops,
    pretrain_clip,
    save_open_clip_weights,
    zero_shot_accuracy,
)
from opensam.errors import InputError
from opensam.model.clip import create_clip, get_tokenizer
from opensam.runtime import run_main, seed_everything, stage_parser, write_json

log = logging.getLogger("stages.demo_clip")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "out", "metrics", "live").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    dc = params.demo_clip
    if dc.scenes < 1 or dc.heldout_scenes < 1 or dc.steps < 1 or dc.batch_size < 2:
        raise InputError(
            f"{args.params}: demo_clip needs scenes, heldout_scenes, steps >= 1 and batch_size >= 2"
        )
    if not 0 < dc.min_crop <= dc.max_crop <= 1:
        raise InputError(f"{args.params}: demo_clip needs 0 < min_crop <= max_crop <= 1")
    seed_everything(params.demo_clip.seed)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    try:
        cfg = PretrainConfig(**{k: v for k, v in dataclasses.asdict(dc).items() if k in fields})
        model = create_clip(params.clip.model, None)
    except ValueError as exc:
        raise InputError(f"{args.params}: demo_clip: {exc}") from None
    start = time.monotonic()
    hw = (round(dc.render_width * params.demo.height / params.demo.width), dc.render_width)
    size = params.image_size
    rendered = render_corpus(dc.seed, dc.scenes + dc.heldout_scenes, size, dc.workers, 0, hw)
    scenes, held = rendered[: dc.scenes], rendered[dc.scenes :]  # one worker pool for both
    log.info("%d + %d scenes in %.0f s", len(scenes), len(held), time.monotonic() - start)

    from dvclive import Live  # heavy import, only where the curve is written

    live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=False)

    def on_step(step: int, loss: float) -> None:
        live.step = step
        live.log_metric("train/loss", loss)
        live.next_step()

    tokenizer = get_tokenizer(params.clip.model)
    losses = pretrain_clip(model, tokenizer, scenes, cfg, on_step)
    live.end()
    images, targets = heldout_crops(held, list(range(len(CLASS_PROMPTS))), cfg.crop_size, dc.seed)
    acc, per = zero_shot_accuracy(model, tokenizer, images, targets, list(CLASS_PROMPTS), cfg.pool)
    save_open_clip_weights(model, args.out)
    metrics = {
        "heldout": {
            "accuracy": round(100 * acc, 2),
            "per_class": {p: round(100 * a, 2) for p, a in zip(CLASS_PROMPTS, per, strict=True)},
            "images": len(targets),
        },
        "final_loss": round(float(np.mean(losses[-10:])), 4),
        "pairs": cfg.steps * cfg.batch_size,
    }
    write_json(args.metrics, metrics)
    log.info("demo CLIP in %.0f s: %s", time.monotonic() - start, metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
