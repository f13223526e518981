"""The mask settings a model was trained with, recorded in its checkpoint and checked against the
mask store a stage is given.

A model trained on masks of one generator and density (``pps``, ``min_region_area``) should see
the same kind of masks at inference; checkpoints record them (key ``masks``) and every stage that
pairs a checkpoint with a store calls :func:`check_store_settings`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opensam.errors import InputError
from opensam.masks.store import MaskStore

log = logging.getLogger(__name__)

SETTING_KEYS = ("generator", "pps", "min_region_area", "image_size")


def open_mask_store(path: Path) -> MaskStore:
    """The finished store at ``path``, opened and checked (InputError naming it otherwise)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: mask store not found (run the masks stage)")
    store = MaskStore(path)
    _ = store.attrs  # opens and validates the file now, not in a DataLoader worker
    return store


def store_settings(store: MaskStore) -> dict[str, Any]:
    """``{generator, pps, min_region_area, image_size}`` of a mask store."""
    attrs = store.attrs
    return {k: attrs.get(k) for k in SETTING_KEYS}


def check_store_settings(
    trained: Mapping[str, Any] | None, store: MaskStore, checkpoint: Path
) -> None:
    """InputError if the settings a checkpoint was trained with differ from ``store``'s.

    A checkpoint without recorded settings (older format) is accepted with a warning."""
    if not trained:
        log.warning("%s: no mask settings recorded; not checked against %s", checkpoint, store.path)
        return
    have = store_settings(store)
    diff = [
        f"{k} {trained.get(k)!r} vs {have[k]!r}" for k in SETTING_KEYS if trained.get(k) != have[k]
    ]
    if diff:
        raise InputError(
            f"{checkpoint}: trained with other masks than {store.path} ({', '.join(diff)}); "
            "rerun the training stages or pass the matching mask store"
        )
