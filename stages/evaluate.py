"""Stage `evaluate`: zero-shot, teacher and student on train/val/test, with and without masks.

    python stages/evaluate.py --prepared data/prepared --masks data/masks.h5 \
        --teacher models/teacher.pt --student models/student.pt --control models/control.pt \
        --oracle models/oracle.pt --oracle-metrics metrics/oracle.json \
        --out metrics/eval.json --plots metrics/eval

Params: ``seed``, ``classes``, ``clip`` (the zero-shot model), ``eval.*``. Writes
``metrics/eval.json`` as ``{model: {"with_masks"|"without_masks": {split: {"miou", "iou"}}}}``
(percent), and into ``--plots``: ``confusion.json`` (student, with masks, test; DVC confusion
template rows on a strided pixel grid), ``confusion.png`` (the full matrix) and
``overlays/<id>.png`` (input | ground truth | student prediction, first ``eval.overlays`` test
images). ``gain`` = student − control and ``gap_closed`` (the share of the control → oracle
gap, :func:`opensam.eval.gains.gap_closed`) per split; no oracle when its stage skipped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch import nn

from opensam.config import Params, load_params
from opensam.eval import evaluation as ev
from opensam.eval import gains
from opensam.eval.plots import save_confusion_png, write_confusion_json
from opensam.eval.zeroshot import build_zeroshot_model
from opensam.masks.settings import check_store_settings, open_mask_store
from opensam.masks.store import MaskStore
from opensam.model.segmenter import load_checkpoint
from opensam.parallel.context import init_runtime, main_output
from opensam.prepared import class_colors, read_prepared
from opensam.runtime import run_main, seed_everything, stage_parser, write_json
from opensam.train.oracle import read_skipped

log = logging.getLogger("stages.evaluate")

PLOTTED = ("student", "test")  # with masks: the confusion matrix and overlays
DERIVED = ("gain", "gap_closed")  # eval.json entries that are not models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "prepared", "masks", "teacher", "student", "out", "plots")
    parser.add_argument("--control", type=Path, default=None, help="labelled-only control")
    parser.add_argument("--oracle", type=Path, default=None, help="the oracle stage's model")
    parser.add_argument("--oracle-metrics", type=Path, default=None, help="its metrics file")
    return parser.parse_args(argv)


def load_models(
    args: argparse.Namespace, params: Params, store: MaskStore, oracle: bool
) -> dict[str, nn.Module]:
    """The models; checkpoints checked against params' classes and the mask store."""
    models: dict[str, nn.Module] = {}
    named = (("teacher", args.teacher), ("control", args.control), ("student", args.student),
             ("oracle", args.oracle if oracle else None))  # fmt: skip
    for name, path in ((n, p) for n, p in named if p is not None):
        models[name], meta = load_checkpoint(
            path, params.class_names, classes_from=str(args.params)
        )
        check_store_settings(meta.get("masks"), store, path)
    zeroshot = build_zeroshot_model(params.clip, params.prompts, params.seed)
    return {"zeroshot": zeroshot, **models}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: batches per rank, rank 0 writes
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    prepared.check_classes(params.class_names, f"{args.params} classes")
    colors = class_colors([c.color for c in params.classes], prepared.colors)
    with main_output(args.plots) as plots_dir:  # rank 0 alone writes (the sink runs there)
        if rt.is_main:
            (plots_dir / "overlays").mkdir(parents=True)
        plots = ev.PlotCollector(
            plots_dir / "overlays", colors, params.class_names, params.eval.overlays
        )
        skipped = "no --oracle" if args.oracle is None else read_skipped(args.oracle_metrics)
        if skipped is not None:
            log.info("oracle: %s", skipped)
        models = load_models(args, params, open_mask_store(args.masks), skipped is None)
        results, plotted_conf = ev.evaluate_models(
            models, prepared, args.masks, params.eval.batch_size, PLOTTED, plots
        )
        if "control" in results:
            results["gain"] = gains.student_gain(results)
            results["gap_closed"] = gains.gap_closed(results, skipped or gains.NO_ORACLE)
        if rt.is_main:
            write_confusion_json(plots_dir / "confusion.json", plots.rows)
        if rt.is_main and plotted_conf is not None:
            save_confusion_png(plots_dir / "confusion.png", plotted_conf, params.class_names)
    if not rt.is_main:
        return 0
    write_json(args.out, results)
    table = ev.format_eval_table({k: v for k, v in results.items() if k not in DERIVED})
    log.info("mIoU (%%):\n%s\ngain, student - control: %s\ngap closed: %s", table,
             results.get("gain"), results.get("gap_closed"))  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
