"""Named params presets, applied on top of an existing params mapping.

``thesis`` switches the pipeline to the configuration of Borko (2023), METHOD.md: OpenCLIP
``convnext_base_w`` / ``laion2b_s13b_b82k``, SAM ViT-H, the thesis epochs, learning rates and
class weights. The thesis does not state its batch size or its chosen α_f; we keep ours and say so.
"""

from __future__ import annotations

import copy
from typing import Any

from opensam.config import parse_params
from opensam.errors import InputError

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
        raise InputError(f"preset {name!r}: unknown (known: {', '.join(sorted(PRESETS))})")
    merged = merge_params(raw, PRESETS[name])
    parse_params(merged, f"preset {name}")
    return merged
