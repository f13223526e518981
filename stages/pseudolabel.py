"""Stage `pseudolabel`: the teacher labels the unlabelled pool of the current ratio.

    python stages/pseudolabel.py --prepared data/prepared --masks data/masks.h5 \
        --teacher models/teacher.pt --out data/pseudo --metrics metrics/pseudo.json

Params: ``ratio`` (pool = first ratio x len(train) ids of splits["unlabelled"]), ``pseudo.*``.
Classes come from the teacher checkpoint. Writes ``data/pseudo/{labels,confidence}/<id>.png``,
``data/pseudo/ids.json`` and ``metrics/pseudo.json`` (mIoU against hidden ground truth, percent,
when the source has it).
"""

from __future__ import annotations

import argparse
import logging

from opensam.config import load_params
from opensam.masks.settings import check_store_settings, open_mask_store
from opensam.model.segmenter import load_checkpoint
from opensam.parallel.context import init_runtime, main_output
from opensam.prepared import read_prepared
from opensam.runtime import run_main, seed_everything, stage_parser, write_json
from opensam.train.pseudo_labels import generate_pseudo_labels

log = logging.getLogger("stages.pseudolabel")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return stage_parser(__doc__, "prepared", "masks", "teacher", "out", "metrics").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    rt = init_runtime(params.runtime)  # under torchrun: batches per rank, rank 0 merges
    prepared = read_prepared(args.prepared).labelled_subset(params.labelled_train, str(args.params))
    store = open_mask_store(args.masks)
    model, meta = load_checkpoint(args.teacher)
    classes = list(meta["classes"])
    prepared.check_classes(classes, str(args.teacher))
    check_store_settings(meta.get("masks"), store, args.teacher)
    ids = prepared.pool_ids(params.ratio)
    log.info("pseudo-labelling %d unlabelled images (ratio %d)", len(ids), params.ratio)
    with main_output(args.out) as tmp:
        summary = generate_pseudo_labels(
            model,
            prepared.root,
            ids,
            args.masks,
            tmp,
            params.pseudo.conf_threshold,
            params.pseudo.batch_size,
            use_masks=True,
            class_names=classes,
        )
    if not rt.is_main:
        return 0
    write_json(args.metrics, summary)
    if "vs_hidden_gt" in summary:
        log.info("pseudo-label mIoU vs hidden ground truth: %.2f", summary["vs_hidden_gt"]["miou"])
    return 0


if __name__ == "__main__":
    run_main(main)
