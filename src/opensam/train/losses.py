"""Loss, schedules and class weights of the training loop (pure functions).

The per-step cosine learning rate, the pseudo-label weight ramp α(t), normalised inverse-frequency
class weights (``auto`` from the prepare stage's metrics) and the weighted NLL with 255 ignored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError, quote

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
    spec: str | Sequence[float], class_names: Sequence[str], data_metrics: Path
) -> list[float]:
    """``auto`` → :func:`class_weights_from_fractions` of ``data_metrics``' train split, else the
    given list (one weight per class)."""
    if not isinstance(spec, str):
        if len(spec) != len(class_names):
            raise InputError(f"class_weights: {len(spec)} values for {len(class_names)} classes")
        return [float(w) for w in spec]
    if spec != "auto":
        raise InputError(f"class_weights: expected 'auto' or a list, got {quote(spec)}")
    try:
        data = json.loads(Path(data_metrics).read_text())
        fractions = data["train"]["class_fractions"]
    except FileNotFoundError:
        raise InputError(f"{data_metrics}: not found (run the prepare stage)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{data_metrics}: no train.class_fractions") from None
    try:
        return class_weights_from_fractions(fractions, class_names)
    except ValueError as exc:
        raise InputError(f"{data_metrics}: {exc}") from None


def segmentation_loss(
    log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Weighted NLL of log_probs (B, C, H, W) float vs target (B, H, W) int64, 255 ignored.

    The mean is weighted (PyTorch's convention); a batch with no labelled pixel gives 0.
    """
    if not bool((target != IGNORE_INDEX).any()):
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, target, weight=weight, ignore_index=IGNORE_INDEX)
