"""Resume data in plain types and tensors, so a checkpoint loads with ``weights_only=True``,
and the fingerprint that says whether a checkpoint belongs to this run.

A planted ``last.pt`` must never run code when a stage resumes: the training engine stores the
random-number states as tensors and ints and its history as plain floats, and loads with
``torch.load(weights_only=True)``, which refuses anything else.

A checkpoint is resumed only when its fingerprint equals the run's: the method's config (which
holds :func:`run_key`: every param the stage reads and the sha256 of every input file: initial
weights, mask store, prepared data, pseudo-labels), the method, the format and the steps per
epoch. Anything
else starts over with one warning line, so a changed setting never continues an old run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
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
    """``value`` with dataclasses turned into dicts and numpy scalars and arrays into python
    numbers and lists (recursive over dicts, lists and tuples); tensors and other values are
    returned as they are."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def input_sha256(path: Path | None) -> str | None:
    """The content hash of an input: a file's sha256; for a folder, the sha256 of its regular
    files' relative paths and hashes (sorted; hidden entries and special files skipped);
    ``missing`` when absent; None for None."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = Path(root, name)
            if file.is_file():
                rel = file.relative_to(path).as_posix()
                digest.update(f"{rel}\0{file_sha256(file)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def local_file(name: str | None) -> Path | None:
    """``name`` as a path when it names an existing file (``clip.pretrained`` may also be an
    open_clip tag, whose weights are fixed by the tag itself), else None."""
    return Path(name) if name and os.path.isfile(name) else None


def run_key(params: Mapping[str, Any], inputs: Mapping[str, Path | None]) -> str:
    """The fingerprint of a training run, a sha256 hex digest of ``params`` (every param the
    run reads, as plain values) and of the content of each input (``name -> path``: initial
    weights, mask store, prepared data, ...; see :func:`input_sha256`). Stored in the method's
    config, so a checkpoint of other settings or other inputs is never resumed."""
    hashes = {name: input_sha256(path) for name, path in inputs.items()}
    log.debug("run key inputs: %s", hashes)
    text = json.dumps({"params": plain(params), "inputs": hashes}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(state: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> list[str]:
    """Names of the fingerprint entries (``config.<field>`` for the config) that differ."""
    out = []
    for key, value in fingerprint.items():
        have = state.get(key)
        if isinstance(value, Mapping) and isinstance(have, Mapping):
            names = sorted(set(value) | set(have))
            out += [f"{key}.{k}" for k in names if have.get(k) != value.get(k)]
        elif have != value:
            out.append(key)
    return out


def _tensor_problem(name: str, value: Any, like: torch.Tensor) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{name} is not a tensor"
    if value.shape != like.shape or value.dtype != like.dtype:
        return f"{name} has shape {tuple(value.shape)} {value.dtype}, not {tuple(like.shape)}"
    if value.is_floating_point() and not bool(value.isfinite().all()):
        return f"{name} holds NaN or infinite values"
    return None


def _weights_problem(name: str, state: Any, like: Mapping[str, torch.Tensor]) -> str | None:
    if not isinstance(state, Mapping) or set(state) != set(like):
        return f"{name}: other weight names"
    problems = (_tensor_problem(f"{name}.{k}", state[k], v) for k, v in like.items())
    return next((p for p in problems if p is not None), None)


def _optimizer_problem(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping):
        return "optimizer: not an optimizer state"
    for index, entry in saved["state"].items():
        if (
            not isinstance(index, int)
            or not 0 <= index < len(params)
            or not isinstance(entry, dict)
        ):
            return "optimizer: state of an unknown parameter"
        for key, value in entry.items():
            if key != "step" and (problem := _tensor_problem(key, value, params[index])):
                return f"optimizer: {problem}"
    return None


def _rng_problem(rng: Any) -> str | None:
    try:
        ok = (
            isinstance(rng["torch"], torch.Tensor)
            and rng["torch"].dtype == torch.uint8
            and tuple(rng["numpy"]["keys"].shape) == (624,)
            and len(rng["python"]["internal"]) == 625
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    return None if ok else "bad random-number states"


def check_resume_state(
    state: Mapping[str, Any],
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None = None,
    epochs: int | None = None,
) -> str | None:
    """Why a resume checkpoint cannot continue this run, or None: each of ``weights`` (entry
    name, dotted for nested entries -> the model's own state dict) with the same names, shapes,
    dtypes and finite values; the optimizer's moments shaped like its parameters; the epoch an
    int in 0..``epochs`` with one history entry per epoch; valid RNG states. Checked before
    anything is loaded, so a bad checkpoint never half-restores a run."""
    for name, like in weights.items():
        value: Any = state
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if (problem := _weights_problem(name, value, like)) is not None:
            return problem
    if optimizer is not None and (problem := _optimizer_problem(state.get("optimizer"), optimizer)):
        return problem
    epoch, history = state.get("epoch"), state.get("history")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return "bad epoch"
    if epochs is not None and epoch > epochs:
        return "bad epoch"
    if not isinstance(history, list) or len(history) != epoch:
        return "bad history"
    return _rng_problem(state.get("rng"))


def read_resume_state(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (loaded with ``weights_only=True``) when it is one of the
    same run: every key of ``fingerprint`` (format, method, config, steps per epoch) equal, and
    RNG states present. None (logged) when it is missing, unreadable, of another format (one an
    older version wrote) or of another run: the engine then starts over, since a corrupt or
    foreign checkpoint must not stop a stage."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint is not fatal: start over
        log.warning("%s: unreadable checkpoint (%s), starting over", path, type(exc).__name__)
        return None
    if not isinstance(state, dict) or not isinstance(state.get("rng"), dict):
        log.warning("%s: not a resume checkpoint, starting over", path)
        return None
    if "format" in fingerprint and state.get("format") != fingerprint["format"]:
        log.warning(
            "%s: checkpoint format %s, this version resumes format %s only; starting over",
            path,
            state.get("format"),
            fingerprint["format"],
        )
        return None
    if differ := _differences(state, fingerprint):
        what = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        log.warning("%s: checkpoint of another run (%s differ), starting over", path, what)
        return None
    return state
