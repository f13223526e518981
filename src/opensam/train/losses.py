"""Loss, schedules and class weights of the training loop (pure functions).

The per-step cosine learning rate, the pseudo-label weight ramp α(t), normalised inverse-frequency
class weights (``auto``: from the labels a run trains on) and the weighted NLL with 255 ignored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError, quote
from opensam.images import read_label_png
from opensam.prepared import class_fractions

log = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, lr_max: float, lr_min: float) -> float:
    """η_t = η_min + ½(η_max − η_min)(1 + cos(π·t/T)) for step t of T."""
    t = min(max(step, 0), total)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t / max(total, 1)))


def alpha_ramp(step: int, total: int, alpha_f: float, t1: float, t2: float) -> float:
    """Pseudo-label loss weight: 0 before T1 = t1·T, linear up to α_f at T2 = t2·T, α_f after."""
    start, end = t1 * total, t2 * total
    if step < start:
        return 0.0
    if step >= end:
        return float(alpha_f)
    return float(alpha_f) * (step - start) / (end - start)


def class_weights_from_fractions(
    fractions: Mapping[str, float], class_names: Sequence[str]
) -> list[float]:
    """Normalised inverse pixel frequency: w_c ∝ 1 / f_c, Σ w_c = 1 (fractions in any unit).

    A class with no pixels gets the largest weight of the others (a warning is logged).
    """
    missing = [c for c in class_names if c not in fractions]
    if missing:
        raise ValueError(f"no class fraction for {', '.join(missing)}")
    inv = [1.0 / float(fractions[c]) if float(fractions[c]) > 0 else 0.0 for c in class_names]
    if max(inv) == 0.0:
        raise ValueError("every class fraction is zero")
    for c, v in zip(class_names, inv, strict=True):
        if v == 0.0:
            log.warning("class %r has no training pixels; giving it the largest weight", c)
    inv = [v if v > 0 else max(inv) for v in inv]
    total = sum(inv)
    return [v / total for v in inv]


def resolve_class_weights(
    spec: str | Sequence[float],
    class_names: Sequence[str],
    data_metrics: Path,
    train_labels: Sequence[Path] | None = None,
) -> list[float]:
    """``auto`` → :func:`class_weights_from_fractions` of the labels a run trains on, else the
    given list (one weight per class).

    Those fractions are ``data_metrics``' train split (the prepare stage counted them) when
    ``train_labels`` (the label files of the run's train images) are that whole split, and the
    pixels of ``train_labels`` otherwise (``labelled_train`` < the split): a run with fewer labels
    never sees the class shares of labels it does not have."""
    if not isinstance(spec, str):
        if len(spec) != len(class_names):
            raise InputError(f"class_weights: {len(spec)} values for {len(class_names)} classes")
        return [float(w) for w in spec]
    if spec != "auto":
        raise InputError(f"class_weights: expected 'auto' or a list, got {quote(spec)}")
    try:
        data = json.loads(Path(data_metrics).read_text())
        fractions = data["train"]["class_fractions"]
        split_size = data["train"].get("images")
    except FileNotFoundError:
        raise InputError(f"{data_metrics}: not found (run the prepare stage)") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise InputError(f"{data_metrics}: no train.class_fractions") from None
    where = data_metrics
    if train_labels is not None and len(train_labels) != split_size:
        fractions = label_fractions(train_labels, class_names)
        where = Path(f"{len(train_labels)} labelled train images")
        log.info("class fractions of %d labelled train images: %s", len(train_labels), fractions)
    try:
        return class_weights_from_fractions(fractions, class_names)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None


def label_fractions(paths: Sequence[Path], class_names: Sequence[str]) -> dict[str, float]:
    """{class: percent of the non-ignored pixels} of the class-id PNGs ``paths``, counted and
    rounded as the prepare stage counts a split (:func:`opensam.prepared.class_fractions`)."""
    histogram = np.zeros(len(class_names), np.int64)
    for path in paths:
        label = read_label_png(path)
        valid = label[label != IGNORE_INDEX]
        histogram += np.bincount(valid, minlength=len(class_names))[: len(class_names)]
    return class_fractions(histogram, class_names)


def segmentation_loss(
    log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Weighted NLL of log_probs (B, C, H, W) float vs target (B, H, W) int64, 255 ignored.

    The mean is weighted (PyTorch's convention); a batch with no labelled pixel gives 0.
    """
    if not bool((target != IGNORE_INDEX).any()):
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, target, weight=weight, ignore_index=IGNORE_INDEX)
