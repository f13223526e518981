"""Reporting a training run: DVCLive curves and the per-split mIoU of the finished model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from opensam.eval.evaluation import evaluate_model
from opensam.eval.metrics import miou_report

log = logging.getLogger(__name__)


def log_history(live: Any, history: Sequence[Mapping[str, Any]]) -> None:
    """Write history entries to a DVCLive ``Live``: one step per epoch (e.g. to replay a resume)."""
    for entry in history:
        for key, value in entry.items():
            if key != "epoch" and value is not None:
                live.log_metric(key, float(value))
        live.next_step()


def open_live(live_dir: Path) -> Any:
    """A DVCLive ``Live`` writing ``<live_dir>/plots/metrics/<name>.tsv`` (and metrics.json);
    it never touches dvc.yaml nor creates a DVC experiment. Starts empty (no resume)."""
    from dvclive import Live  # heavy import, only where curves are written

    return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False)


def evaluate_splits(
    model: nn.Module,
    prepared: Path,
    split_ids: Mapping[str, Sequence[str]],
    masks: Path | None,
    batch_size: int,
    class_names: Sequence[str],
    use_masks: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{split: miou_report}`` (percent) for each non-empty split, labels from
    ``prepared/labels``; with SAM aggregation when ``use_masks``."""
    out: dict[str, dict[str, Any]] = {}
    for split, ids in split_ids.items():
        if not ids:
            log.warning("split %s is empty: not evaluated", split)
            continue
        labels = Path(prepared) / "labels"
        conf = evaluate_model(model, prepared, list(ids), labels, masks, batch_size, use_masks)
        out[split] = miou_report(conf, list(class_names))
    return out
