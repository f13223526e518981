"""Resume data in plain types and tensors, so a checkpoint loads with ``weights_only=True``.

A planted ``last.pt`` must never run code when a stage resumes: the training loop stores the
random-number states as tensors and ints and its history as plain floats, and loads with
``torch.load(weights_only=True)``, which refuses anything else.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """torch, numpy and python random states as tensors, ints and lists of ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into python numbers and lists (recursive
    over dicts, lists and tuples); tensors and other values are returned as they are."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def read_resume_state(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``) when it is one of the
    same run: every key of ``fingerprint`` (format, config, steps per epoch) equal, and RNG
    states present. None (logged) when it is missing, unreadable or of another run: the loop
    then starts over, since a corrupt or foreign checkpoint must not stop a stage."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint is not fatal: start over
        log.warning("%s: unreadable checkpoint (%s), starting over", path, type(exc).__name__)
        return None
    same = isinstance(state, dict) and isinstance(state.get("rng"), dict)
    if not same or any(state.get(k) != v for k, v in fingerprint.items()):
        log.warning("%s: checkpoint of a different configuration, starting over", path)
        return None
    return state
