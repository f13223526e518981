"""Stage `evaluate`: zero-shot, teacher and student on train/val/test, with and without masks.

    python stages/evaluate.py --prepared data/prepared --masks data/masks.h5 \
        --teacher models/teacher.pt --student models/student.pt \
        --out metrics/eval.json --plots metrics/eval

Params: ``seed``, ``classes``, ``clip`` (the zero-shot model), ``eval.*``. Writes
``metrics/eval.json`` as ``{model: {"with_masks"|"without_masks": {split: {"miou", "iou"}}}}``
(percent), and into ``--plots``: ``confusion.json`` (student, with masks, test; DVC confusion
template rows on a strided pixel grid), ``confusion.png`` (the full matrix) and
``overlays/<id>.png`` (input | ground truth | student prediction, first ``eval.overlays`` test
images).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from opensam.config import Params, load_params
from opensam.errors import InputError
from opensam.eval.evaluation import (
    PlotCollector,
    class_colors,
    evaluate_model_modes,
    format_eval_table,
    load_splits,
)
from opensam.eval.metrics import miou_report
from opensam.eval.plots import save_confusion_png, write_confusion_json
from opensam.model.segmenter import build_model, load_checkpoint
from opensam.parallel.context import init_runtime, main_output
from opensam.runtime import atomic_path, run_main, seed_everything

log = logging.getLogger("stages.evaluate")

SPLITS = ("train", "val", "test")
MODES = {"with_masks": True, "without_masks": False}
PLOTTED = ("student", "test")  # with masks: the confusion matrix and overlays


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def load_models(args: argparse.Namespace, params: Params) -> dict[str, nn.Module]:
    """The three models, classes checked against params (checkpoints first: fail fast)."""
    teacher, _ = load_checkpoint(args.teacher, expected_classes=params.class_names)
    student, _ = load_checkpoint(args.student, expected_classes=params.class_names)
    # loading consumed random numbers: reseed so this is the zeroshot stage's exact model
    seed_everything(params.seed)
    zeroshot = build_model(params.clip, params.prompts)
    return {"zeroshot": zeroshot, "teacher": teacher, "student": student}


def evaluate_all(
    args: argparse.Namespace, params: Params, splits: dict[str, Any], plots: PlotCollector
) -> tuple[dict[str, Any], Any]:
    """All (model, mode, split) reports, and the plotted combination's confusion matrix.

    Both mask modes come from one pass per (model, split): the images are embedded once."""
    results: dict[str, Any] = {}
    plotted_conf = None
    modes = tuple(MODES.values())  # with masks first: the plots show the with-masks prediction
    for model_name, model in load_models(args, params).items():
        results[model_name] = {mode: {} for mode in MODES}
        for split in SPLITS:
            ids = list(splits.get(split, []))
            if not ids:
                log.warning("split %s is empty; skipped", split)
                continue
            plotted = (model_name, split) == PLOTTED
            confs = evaluate_model_modes(
                model,
                args.prepared,
                ids,
                args.prepared / "labels",
                args.masks,
                params.eval.batch_size,
                modes,
                sink=plots if plotted else None,
            )
            plotted_conf = confs[True] if plotted else plotted_conf
            for mode, use_masks in MODES.items():
                results[model_name][mode][split] = miou_report(confs[use_masks], params.class_names)
    return results, plotted_conf


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: batches per rank, rank 0 writes
    splits = load_splits(args.prepared)
    if list(splits.get("classes", params.class_names)) != params.class_names:
        raise InputError(f"{args.prepared}/splits.json: classes differ from {args.params}")
    if not args.masks.is_file():
        raise InputError(f"{args.masks}: mask store not found (run the masks stage)")
    colors = class_colors([c.color for c in params.classes], splits.get("colors"))
    with main_output(args.plots) as plots_dir:  # rank 0 alone writes (the sink runs there)
        if rt.is_main:
            (plots_dir / "overlays").mkdir(parents=True)
        plots = PlotCollector(
            plots_dir / "overlays", colors, params.class_names, params.eval.overlays
        )
        results, plotted_conf = evaluate_all(args, params, splits, plots)
        if rt.is_main:
            write_confusion_json(plots_dir / "confusion.json", plots.rows)
        if rt.is_main and plotted_conf is not None:
            save_confusion_png(plots_dir / "confusion.png", plotted_conf, params.class_names)
    if not rt.is_main:
        return 0
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    log.info("mIoU (%%):\n%s", format_eval_table(results))
    return 0


if __name__ == "__main__":
    run_main(main)
