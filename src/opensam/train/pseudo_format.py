"""The pseudo-label folder format (``data/pseudo/``): its layout, how a prediction becomes its
files, and reading its ids back.

Layout::

    labels/<id>.png      mode L uint8 class ids; 255 where the max probability < conf_threshold
    confidence/<id>.png  mode L uint8 round(255 * max probability)
    ids.json             the labelled ids, a JSON list in pool order
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError
from opensam.runtime import read_json

LABELS_DIR = "labels"
CONFIDENCE_DIR = "confidence"
IDS_FILE = "ids.json"


def hard_labels(
    log_probs: torch.Tensor, conf_threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels from (B, C, H, W) log-probabilities.

    Returns labels (B, H, W) uint8 (argmax; ``IGNORE_INDEX`` where the max probability is below
    ``conf_threshold``, when set) and the max probability (B, H, W) float32 in [0, 1].
    """
    if log_probs.shape[1] >= IGNORE_INDEX:
        raise ValueError(f"{log_probs.shape[1]} classes do not fit uint8 labels with 255 = ignore")
    conf, labels = log_probs.float().exp().max(dim=1)
    labels = labels.to(torch.uint8)
    if conf_threshold is not None:
        labels[conf < conf_threshold] = IGNORE_INDEX
    return labels, conf


def confidence_to_uint8(conf: torch.Tensor) -> np.ndarray:
    """Max probability (..., H, W) float in [0, 1] -> uint8 round(255 * p)."""
    return conf.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()


def load_pseudo_ids(pseudo_dir: Path) -> list[str]:
    """The ids of a pseudo-label folder (``ids.json``), checking every label file exists."""
    path = Path(pseudo_dir) / IDS_FILE
    ids = read_json(path, "run the pseudolabel stage")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputError(f"{path}: expected a JSON list of image ids")
    missing = [i for i in ids if not (Path(pseudo_dir) / LABELS_DIR / f"{i}.png").is_file()]
    if missing:
        raise InputError(f"{path}: {len(missing)} ids have no label file, e.g. {missing[0]}")
    return ids
