"""Reporting a training run: DVCLive curves (the per-split mIoU is
:func:`opensam.eval.evaluation.evaluate_splits`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
