"""Named params presets, applied on top of an existing params mapping.

``thesis`` switches the pipeline to the configuration of Borko (2023), METHOD.md: OpenCLIP
``convnext_base_w`` / ``laion2b_s13b_b82k``, SAM ViT-H, the thesis epochs, learning rates and
class weights. The thesis does not state its batch size or its chosen α_f; we keep ours and say so.

:func:`apply_preset_to_file` edits the user's file in place through a round-trip YAML parser
(ruamel.yaml): comments, key order and flow/block layout stay as written, only the values the
preset changes are replaced, and it returns one ``key: old -> new`` line per change.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from opensam.config import parse_params
from opensam.errors import InputError, quote
from opensam.runtime import atomic_path

THESIS: dict[str, Any] = {
    "image_size": 256,  # thesis: 255; 256 keeps the 32-stride grid exact (8×8)
    "pps": 16,
    "min_region_area": 0,
    "ratio": 4,  # the thesis's best test mIoU (60:240)
    "classes": [
        {"name": "lizard", "prompt": "a lizard", "color": [250, 220, 40]},
        {"name": "hand", "prompt": "a human hand", "color": [40, 200, 60]},
        {"name": "color board", "prompt": "a color bord", "color": [40, 90, 230]},  # sic
        {"name": "background", "prompt": "a background", "color": [150, 60, 190]},
    ],
    "data": {"split": {"train": 60, "val": 10, "test": 8}},
    "masks": {"generator": "sam", "max_ratio": 8},
    "sam": {"model": "vit_h", "checkpoint": "models/sam_vit_h_4b8939.pth", "input": "prepared"},
    "clip": {"model": "convnext_base_w", "pretrained": "laion2b_s13b_b82k", "templates": False},
    "ablation": {"pps": [8, 16, 32, 64], "min_region_area": [0, 100], "images": 47},
    "warmup": {
        "epochs": 30,
        "lr_max": 3.0e-7,
        "lr_min": 1.0e-8,
        "weight_decay": 1.0e-8,
        "betas": [0.9, 0.999],
        "class_weights": [0.4, 0.4, 0.15, 0.05],
        "augment": False,
        "drop_path": 0.0,
        "use_masks": True,
    },
    "student": {
        "mode": "offline",  # the thesis's rounds
        "iterations": 3,
        "epochs": 50,
        "lr_max": 3.0e-7,
        "lr_min": 1.0e-8,
        "weight_decay": 1.0e-8,
        "betas": [0.9, 0.999],
        "class_weights": [0.1, 0.15, 0.15, 0.6],
        "augment": False,
        "drop_path": 0.0,
        "use_masks": True,
        "t1": 0.2,
        "t2": 0.8,
    },
    "pseudo": {"conf_threshold": None},
}

PRESETS: dict[str, dict[str, Any]] = {"thesis": THESIS}


def merge_params(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overlay`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_params(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """Return ``raw`` with preset ``name`` applied; the result is validated like params.yaml."""
    if name not in PRESETS:
        raise InputError(f"preset {quote(name)}: unknown (known: {', '.join(sorted(PRESETS))})")
    merged = merge_params(raw, PRESETS[name])
    parse_params(merged, f"preset {name}")
    return merged


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else json.dumps(_plain(value))


_UNSET = object()


def _plain(value: Any) -> Any:
    """A round-trip YAML node as plain python (dicts, lists, numbers, strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _node(value: Any) -> Any:
    """A new value for the file: lists and mappings in flow style (one line), as the file has."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        node: Any = CommentedMap((k, _node(v)) for k, v in value.items())
    elif isinstance(value, list):
        node = CommentedSeq(_node(v) for v in value)
    else:
        return value
    node.fa.set_flow_style()
    return node


def _overlay(node: Any, overlay: Mapping[str, Any], prefix: str, changes: list[str]) -> None:
    for key, new in overlay.items():
        path, old = f"{prefix}{key}", node.get(key, _UNSET)
        if isinstance(new, dict) and isinstance(old, Mapping):
            _overlay(old, new, f"{path}.", changes)
        elif (
            isinstance(new, list)
            and isinstance(old, list)
            and len(new) == len(old)
            and all(
                isinstance(n, dict) and isinstance(o, Mapping)
                for n, o in zip(new, old, strict=True)
            )
        ):
            for i, (n, o) in enumerate(zip(new, old, strict=True)):
                _overlay(o, n, f"{path}[{i}].", changes)
        elif old is _UNSET or _plain(old) != new:
            changes.append(f"{path}: {_show(old)} -> {_show(new)}")
            node[key] = _node(new)


def apply_preset_to_file(path: Path, name: str) -> list[str]:
    """Apply preset ``name`` to the params file ``path`` in place, keeping its comments and
    layout; the result is validated first. Returns the changes (``key: old -> new``)."""
    if name not in PRESETS:
        raise InputError(f"preset {quote(name)}: unknown (known: {', '.join(sorted(PRESETS))})")
    try:
        text = Path(path).read_text()
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        what = "is empty" if raw is None else "has no mapping at the top level"
        raise InputError(f"{path}: {what}; expected the params mapping (see params.yaml)")
    rt = _round_trip_yaml(text)
    doc = rt.load(text)
    changes: list[str] = []
    _overlay(doc, PRESETS[name], "", changes)
    parse_params(_plain(doc), str(path))
    with atomic_path(path) as tmp:
        tmp.write_text(_dump(rt, doc))
    return changes


def _dump(rt: Any, doc: Any) -> str:
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def _round_trip_yaml(text: str) -> Any:
    """A ruamel.yaml round-trip parser with the block-list indentation ``text`` uses (the one
    that reproduces the file unchanged, else the one that changes the fewest lines)."""
    from ruamel.yaml import YAML

    best, best_diff = None, None
    for sequence, offset in ((4, 2), (2, 0), (2, 2), (4, 0)):
        rt = YAML()
        rt.width = 4096  # never re-wrap the user's lines
        rt.preserve_quotes = True
        rt.indent(mapping=2, sequence=sequence, offset=offset)
        lines = _dump(rt, rt.load(text)).splitlines()
        diff = sum(a != b for a, b in zip(lines, text.splitlines(), strict=False))
        diff += abs(len(lines) - len(text.splitlines()))
        if best_diff is None or diff < best_diff:
            best, best_diff = rt, diff
    return best
