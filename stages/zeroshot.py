"""Stage `zeroshot`: the zero-shot ablation of thesis Table 3.1 (no training).

    python stages/zeroshot.py --prepared data/prepared --ablation data/ablation \
        --out metrics/zeroshot.json --table metrics/zeroshot.md --plot metrics/zeroshot_plot.csv

Params: ``seed``, ``classes``, ``clip``, ``ablation``. The scoring is
:func:`opensam.eval.zeroshot.run_ablation`; the model is
:func:`opensam.eval.zeroshot.build_zeroshot_model`, the one ``evaluate`` scores too.
"""

from __future__ import annotations

import argparse
import json

from opensam.config import load_params
from opensam.eval.zeroshot import (
    ablation_quality,
    build_zeroshot_model,
    format_csv,
    format_quality_table,
    format_table,
    run_ablation,
)
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import atomic_path, run_main, seed_everything, stage_parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "prepared", "ablation", "out", "table", "plot").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    init_runtime(params.runtime)  # one process: not launched through torchrun
    prepared = read_prepared(args.prepared)
    prepared.check_classes(params.class_names, f"{args.params} classes")
    model = build_zeroshot_model(params.clip, params.prompts, params.seed)
    ab, clip = params.ablation, params.clip
    results, count = run_ablation(
        model, prepared, args.ablation, ab.pps, ab.min_region_area, ab.images
    )
    note = (
        f"Zero-shot mIoU on {count} train images; CLIP {clip.model} "
        f"({clip.pretrained or 'random init'}). Thesis: convnext_base_w LAION-2B + SAM ViT-H."
    )
    quality = ablation_quality(prepared, args.ablation, ab.pps, ab.min_region_area, ab.images)
    iou = results["baseline"].get("iou", {})
    note += "\n\nPer-pixel IoU (%): " + ", ".join(f"{k} {v}" for k, v in iou.items())
    texts = {
        args.out: json.dumps({**results, "mask_quality": quality}, indent=2) + "\n",
        args.table: note
        + "\n\n"
        + format_table(results, ab.pps)
        + "\n\nMask quality of each store on the same images (opensam.eval.mask_quality):\n\n"
        + format_quality_table(quality),
        args.plot: format_csv(results, ab.pps),
    }
    for path, text in texts.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return 0


if __name__ == "__main__":
    run_main(main)
