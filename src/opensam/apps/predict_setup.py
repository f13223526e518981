"""How a predict run is set up from a checkpoint: the region masks it was trained with, and the
overlay colours (the one rule of :func:`opensam.prepared.class_colors`).

The mask settings recorded in the checkpoint (generator, ``pps``, ``min_region_area``) win over
params.yaml, which may have changed since training; a flag overrides them, and the log says which
source each value came from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from opensam.config import MasksParams, Params, Sam2Params, SamParams
from opensam.masks.generators import MaskGenerator, build_generator
from opensam.prepared import class_colors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskChoice:
    """The region masks of a predict run; ``generator`` ``none`` = per-pixel prediction."""

    generator: str
    pps: int
    min_region_area: int


def choose_masks(
    meta: Mapping[str, Any],
    params: Params,
    generator: str | None = None,
    pps: int | None = None,
    min_region_area: int | None = None,
    checkpoint: str = "checkpoint",
) -> MaskChoice:
    """Flag if given, else the checkpoint's recorded training setting, else params.yaml."""
    trained = meta.get("masks") or {}
    values: dict[str, Any] = {}
    for key, flag, fallback in (
        ("generator", generator, params.masks.generator),
        ("pps", pps, params.pps),
        ("min_region_area", min_region_area, params.min_region_area),
    ):
        value, source = (flag, "flag") if flag is not None else (trained.get(key), checkpoint)
        if value is None:
            value, source = fallback, "params.yaml (not recorded in the checkpoint)"
        values[key] = value
        log.info("masks %s = %s (from %s)", key, value, source)
    return MaskChoice(str(values["generator"]), int(values["pps"]), int(values["min_region_area"]))


def build_mask_generator(
    choice: MaskChoice,
    masks: MasksParams,
    sam: SamParams,
    image_size: int,
    sam2: Sam2Params | None = None,
) -> MaskGenerator | None:
    """The generator of ``choice`` making masks at ``image_size``², or None for ``none``."""
    if choice.generator == "none":
        return None
    return build_generator(
        choice.generator, choice.pps, choice.min_region_area, masks, sam, image_size, sam2
    )


def overlay_colors(params: Params, meta: Mapping[str, Any]) -> np.ndarray:
    """(C, 3) uint8: params ``classes[].color``, else the training labelmap's colour recorded in
    the checkpoint, else the fixed palette: the colours ``evaluate`` draws too."""
    return class_colors([c.color for c in params.classes], meta.get("labelmap_colors") or None)
