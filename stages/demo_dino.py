"""Stage `demo_dino`: pretrain the demo's small self-supervised ViT (DINO) on generated scenes.

    python stages/demo_dino.py --out models/demo_dino.pt --metrics metrics/demo_dino.json \
        --live metrics/live/demo_dino

Params: ``image_size``, ``demo.width``, ``demo.height``, ``demo_dino.*``, ``model.backbone``.
While ``model.backbone`` has no DINO (the default ``clip``) no stage reads these weights, so the
stage trains nothing: it writes a marker that :func:`opensam.model.dino.create_dino` refuses
with a one-line error, and metrics saying so (3 minutes of the default ``dvc repro``). Draws
``demo_dino.scenes`` scenes with the demo generator under the corpus's own seed
(``demo_dino.seed``; never the demo photos or their labels), trains ``opensam-dino-tiny`` from
random init with lightly's DINO loss, head and multi-crop views, and writes a plain timm
state_dict to ``--out`` (``dino.pretrained: models/demo_dino.pt``). The metrics hold the final
loss and, before and after training, two measures on ``demo_dino.heldout_scenes`` further
scenes (:func:`opensam.demo.dino_pretrain.heldout_accuracies`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np

from opensam.config import Params, load_params
from opensam.constants import DEMO_DINO_UNTRAINED_KEY
from opensam.runtime import run_main, save_torch, seed_everything, stage_parser, write_json

log = logging.getLogger("stages.demo_dino")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "out", "metrics", "live").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    if not params.model.has_dino:
        why = (
            f"the demo DINO was not trained: model.backbone is {params.model.backbone!r} "
            "(set it to dino or clip+dino and run `dvc repro`)"
        )
        save_torch({DEMO_DINO_UNTRAINED_KEY: why}, args.out)
        metrics = {"trained": False, "backbone": params.model.backbone}
        from dvclive import Live  # the curve output: the summary alone (git keeps no empty dir)

        with Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=False) as live:
            live.summary = dict(metrics)
        write_json(args.metrics, metrics)
        log.info("%s", why)
        return 0
    train(args, params)
    return 0


def train(args: argparse.Namespace, params: Params) -> None:
    """Pretrain, measure and write the weights and metrics."""
    # imported here, not above: lightly's import alone takes seconds, and the default run
    # (model.backbone: clip) never trains
    from opensam.demo.captions import CLASS_PROMPTS, render_corpus
    from opensam.demo.dino_pretrain import DinoPretrainConfig, heldout_accuracies, pretrain_dino
    from opensam.demo.pretrain import heldout_crops, save_open_clip_weights
    from opensam.model.dino import DINO_TINY, create_dino

    dd = params.demo_dino
    seed_everything(dd.seed)
    fields = {f.name for f in dataclasses.fields(DinoPretrainConfig)}
    cfg = DinoPretrainConfig(**{k: v for k, v in dataclasses.asdict(dd).items() if k in fields})
    start = time.monotonic()
    hw = (round(dd.render_width * params.demo.height / params.demo.width), dd.render_width)
    rendered = render_corpus(
        dd.seed, dd.scenes + dd.heldout_scenes, params.image_size, dd.workers, 0, hw
    )
    scenes, held = rendered[: dd.scenes], rendered[dd.scenes :]
    log.info("%d + %d scenes in %.0f s", len(scenes), len(held), time.monotonic() - start)
    vit = create_dino(DINO_TINY, None)
    classes = list(range(len(CLASS_PROMPTS)))
    images, targets = heldout_crops(held, classes, cfg.global_crop, dd.seed)
    before = heldout_accuracies(vit, held, images, targets, classes)

    from dvclive import Live  # heavy import, only where the curve is written

    live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=False)

    def on_step(step: int, loss: float) -> None:
        live.step = step
        live.log_metric("train/loss", loss)
        live.next_step()

    losses = pretrain_dino(vit, scenes, cfg, on_step)
    live.end()
    after = heldout_accuracies(vit, held, images, targets, classes)
    save_open_clip_weights(vit, args.out)  # a plain state_dict of CPU tensors
    metrics = {
        "trained": True,
        "heldout": {
            **after,
            "random_init_accuracy": before["prototype_accuracy"],
            "random_init_region_probe_accuracy": before["region_probe_accuracy"],
            "images": len(targets),
            "probe_scenes": len(held),
        },
        "final_loss": round(float(np.mean(losses[-10:])), 4),
        "steps": cfg.steps,
    }
    write_json(args.metrics, metrics)
    log.info("demo DINO in %.0f s: %s", time.monotonic() - start, metrics)


if __name__ == "__main__":
    run_main(main)
