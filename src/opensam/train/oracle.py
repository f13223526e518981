"""The oracle: the student's own training with the pool's hidden ground truth in place of the
teacher's pseudo-labels, the upper bound that ``gap_closed`` measures the student against.

The run is the student's (:func:`opensam.train.online_setup.run_online_student` or
:func:`opensam.train.self_training.run_self_training`: the same init, schedule, steps,
augmentation, seed and, online, the EMA teacher that is validated and kept); only the targets of
the unlabelled pool change:

- ``online``: the weak views carry their true labels and the unlabelled loss learns them (every
  labelled pixel counts as confident) instead of the EMA teacher's confident predictions;
- ``offline``: every round trains on the true labels, written in the pseudo-label folder format
  (:func:`write_truth_folder`), and no round relabels the pool.

It needs hidden ground truth (``prepared/unlabelled_gt/<id>.png``, from ``data.unlabelled_gt``)
for every image of the pool; a data set without any is skipped (:func:`skip_reason`): its
metrics file holds ``{"skipped": reason}`` and its model path a marker without weights
(:func:`write_skipped`), which ``evaluate`` recognises (:func:`read_skipped`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from opensam.errors import InputError
from opensam.parallel.context import barrier, current_runtime, main_output
from opensam.prepared import Prepared
from opensam.runtime import read_json, save_torch, write_json
from opensam.train.pseudo_format import IDS_FILE, LABELS_DIR

NO_HIDDEN_GT = "no hidden ground truth (data.unlabelled_gt is null): the oracle needs the pool's"


def skip_reason(prepared: Prepared, pool_ids: Sequence[str]) -> str | None:
    """Why the oracle cannot run on ``prepared`` (None: it can). InputError when only some of
    the pool's images have hidden ground truth (an oracle on part of the pool is no bound)."""
    if not prepared.has_hidden_gt:
        return NO_HIDDEN_GT
    if not pool_ids:
        return "the pool is empty (ratio 0): the oracle is the control"
    missing = [i for i in pool_ids if not (prepared.hidden_gt_dir / f"{i}.png").is_file()]
    if missing:
        raise InputError(
            f"{prepared.hidden_gt_dir}: no hidden ground truth for {len(missing)} of the pool's "
            f"{len(pool_ids)} images (e.g. {missing[0]}.png)"
        )
    return None


def write_truth_folder(prepared: Prepared, pool_ids: Sequence[str], out: Path) -> Path:
    """The pool's hidden ground truth as a pseudo-label folder ``out`` (``labels/<id>.png``,
    ``ids.json``), for the offline rounds; kept if it exists (a resumed run). Under torchrun
    rank 0 writes it and every rank waits for it."""
    if not out.is_dir():
        with main_output(out) as tmp:
            if current_runtime().is_main:  # the others get rank 0's temporary: hands off
                (tmp / LABELS_DIR).mkdir(parents=True)
                for image_id in pool_ids:
                    src = prepared.hidden_gt_dir / f"{image_id}.png"
                    shutil.copyfile(src, tmp / LABELS_DIR / f"{image_id}.png")
                (tmp / IDS_FILE).write_text(json.dumps(list(pool_ids)) + "\n")
    barrier()
    return out


def write_skipped(out: Path, metrics: Path, reason: str) -> None:
    """The outputs of a skipped run: the reason in ``metrics``, a marker (no weights) at ``out``."""
    save_torch({"skipped": reason}, out)
    write_json(metrics, {"skipped": reason})


def read_skipped(metrics: Path | None) -> str | None:
    """Why the oracle of ``metrics`` (the stage's metrics file) was skipped; None if it ran
    (or no metrics file is given)."""
    if metrics is None:
        return None
    report = read_json(metrics, "run the oracle stage")
    if not isinstance(report, dict):
        raise InputError(f"{metrics}: expected a JSON object")
    skipped = report.get("skipped")
    return None if skipped is None else str(skipped)[:200]
