"""The zero-shot ablation of thesis Table 3.1 (no training) and the zero-shot model itself.

Scores the first ``images`` train images in every ablation store ``pps{P}_mra{A}.h5``: the
per-pixel baseline, NU at area 0 (``nu``), NU and PM at each other area A (``nu_mra{A}``,
``pm_mra{A}``), for every pps. Each image is embedded once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from opensam.config import ClipParams
from opensam.data.datasets import read_image, read_label
from opensam.errors import InputError
from opensam.eval.mask_quality import store_quality
from opensam.eval.metrics import (
    confusion_matrix,
    format_miou_table,
    miou_from_confusion,
    miou_report,
)
from opensam.masks.store import MaskStore
from opensam.model.segmenter import OpenSamModel, build_model
from opensam.prepared import Prepared

log = logging.getLogger(__name__)
Results = dict[str, dict[str, Any]]

THESIS = {  # thesis Table 3.1 (METHOD.md), mIoU % on 47 train images, SAM ViT-H
    "baseline": {"miou": 48.92},
    "nu": {"pps8": 75.88, "pps16": 85.12, "pps32": 86.98, "pps64": 86.87},
    "nu_mra100": {"pps8": 75.87, "pps16": 85.09, "pps32": 86.91, "pps64": 86.62},
    "pm_mra100": {"pps8": 75.45, "pps16": 74.11, "pps32": 71.78, "pps64": 71.32},
}


def build_zeroshot_model(clip: ClipParams, prompts: list[str], seed: int) -> OpenSamModel:
    """The zero-shot model (CLIP tower + prompt embeddings, no training): the same weights for the
    zeroshot and evaluate stages. Random-init towers are drawn from ``seed`` in a forked RNG, so
    the result does not depend on what ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(clip, prompts)


def ablation_store_path(ablation_dir: Path, pps: int, area: int) -> Path:
    """``<ablation_dir>/pps{P}_mra{A}.h5``, the store of one ablation cell."""
    return Path(ablation_dir) / f"pps{pps}_mra{area}.h5"


def select_ids(
    train: Sequence[str], stores: Sequence[MaskStore], count: int, size: int
) -> list[str]:
    """The first ``count`` train ids present in every store (stores must match ``size``)."""
    for store in stores:
        if store.attrs.get("image_size") != size:
            raise InputError(f"{store.path}: masks are not {size}x{size} like the images")
    held = [set(store.ids()) for store in stores]
    ids = [i for i in train if all(i in h for h in held)][:count]
    if not ids:
        raise InputError(f"{stores[0].path.parent}: no train image is in every ablation store")
    return ids


def variant_confusion(
    model: OpenSamModel,
    emb: torch.Tensor,
    labels: dict[str, torch.Tensor],
    store: MaskStore | None,
    variant: str = "nu",
) -> np.ndarray:
    """Confusion (C, C) int64 of one variant over all images (``store`` None: per pixel)."""
    conf = np.zeros((model.num_classes,) * 2, np.int64)
    for i, (image_id, label) in enumerate(labels.items()):
        masks = None if store is None else store.read(image_id).masks
        pred = model.predict_embedding(emb[i], (label.shape[0], label.shape[1]), masks, variant)
        conf += confusion_matrix(pred, label, model.num_classes)
    return conf


def score_variant(
    model: OpenSamModel,
    emb: torch.Tensor,
    labels: dict[str, torch.Tensor],
    store: MaskStore | None,
    variant: str = "nu",
) -> float:
    """mIoU (%) of one variant over all images (``store`` None: the per-pixel baseline)."""
    return round(
        100.0 * miou_from_confusion(variant_confusion(model, emb, labels, store, variant)), 2
    )


def run_ablation(
    model: OpenSamModel,
    prepared: Prepared,
    ablation_dir: Path,
    pps: Sequence[int],
    areas: Sequence[int],
    images: int,
) -> tuple[Results, int]:
    """All variants' mIoU (%) and the number of images scored."""
    stores = {
        (p, a): MaskStore(ablation_store_path(ablation_dir, p, a)) for p, a in product(pps, areas)
    }
    size = prepared.image_size
    ids = select_ids(prepared.train, list(stores.values()), images, size)
    if len(ids) < images:
        log.warning("only %d of %d ablation images are in every store", len(ids), images)
    emb = model.embed_many([read_image(prepared.image_path(i)) for i in ids])
    labels = {i: read_label(prepared.label_path(i), (size, size)) for i in ids}
    # the baseline reports per-class IoU too: a class the tower never learned shows up here
    results: Results = {
        "baseline": miou_report(variant_confusion(model, emb, labels, None), list(prepared.classes))
    }
    variants = [("nu" if a == 0 else f"nu_mra{a}", a, "nu") for a in areas]
    variants += [(f"pm_mra{a}", a, "pm") for a in areas if a]
    jobs = [(key, p, a, v) for key, a, v in variants for p in pps]
    for key, p, area, variant in tqdm(jobs, desc="variants", unit="variant"):
        results.setdefault(key, {})[f"pps{p}"] = score_variant(
            model, emb, labels, stores[p, area], variant
        )
    log.info("zero-shot mIoU (%%) on %d images: %s", len(ids), results)
    return results, len(ids)


def ablation_quality(
    prepared: Prepared, ablation_dir: Path, pps: Sequence[int], areas: Sequence[int], images: int
) -> dict[str, dict[str, float]]:
    """:func:`~opensam.eval.mask_quality.store_quality` of every ablation store, on the images
    :func:`run_ablation` scores (keys ``pps<p>_mra<a>``)."""
    stores = {
        (p, a): MaskStore(ablation_store_path(ablation_dir, p, a)) for p, a in product(pps, areas)
    }
    ids = select_ids(prepared.train, list(stores.values()), images, prepared.image_size)
    return {f"pps{p}_mra{a}": store_quality(s, ids, prepared) for (p, a), s in stores.items()}


def format_quality_table(quality: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown: one row per store, its ABO, ceiling mIoU, masks per image and uncovered %."""
    lines = [
        "| store | ABO | ceiling mIoU (%) | masks / image | uncovered (%) |",
        "|---|---|---|---|---|",
    ]
    for key, q in quality.items():
        lines.append(
            f"| {key} | {q['abo']:.3f} | {q['ceiling_miou']:.2f} | "
            f"{q['masks_per_image']:.1f} | {100 * q['uncovered']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def format_table(results: Results, pps: Sequence[int]) -> str:
    """Markdown laid out like thesis Table 3.1, each row followed by the thesis's numbers."""
    names = {"baseline": "OpenCLIP alone", "nu": "+ SAM, NU"}
    names |= {k: f"+ SAM, {k[:2].upper()}, MMRA={k[6:]}" for k in results if "_mra" in k}
    cols, heads = ["miou"] + [f"pps{p}" for p in pps], ["baseline"] + [f"pps={p}" for p in pps]
    return format_miou_table(results, cols, ["mIoU (%)", *heads], names, THESIS)


def format_csv(results: Results, pps: Sequence[int]) -> str:
    """One row per pps, one column per variant (``pps,nu,nu_mra100,pm_mra100``)."""
    keys = [k for k in results if k != "baseline"]
    rows = ["pps," + ",".join(keys)]
    rows += [f"{p}," + ",".join(str(results[k].get(f"pps{p}", "")) for k in keys) for p in pps]
    return "\n".join(rows) + "\n"
