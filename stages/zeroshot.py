"""Stage `zeroshot`: the zero-shot ablation of thesis Table 3.1 (no training).

    python stages/zeroshot.py --prepared data/prepared --ablation data/ablation \
        --out metrics/zeroshot.json --table metrics/zeroshot.md --plot metrics/zeroshot_plot.csv

Params: ``seed``, ``classes``, ``clip``, ``ablation``. Scores the first ``ablation.images`` train
images in every store ``<ablation>/pps{P}_mra{A}.h5``: the per-pixel baseline, NU at area 0
(``nu``), NU and PM at each other area A (``nu_mra{A}``, ``pm_mra{A}``), for every pps. Each
image is embedded once.
"""

from __future__ import annotations

import argparse
import json
import logging
from itertools import product
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from opensam.config import Params, load_params
from opensam.data.datasets import read_image, read_label
from opensam.errors import InputError
from opensam.eval.evaluation import load_splits
from opensam.eval.metrics import confusion_matrix, format_miou_table, miou_from_confusion
from opensam.masks.store import MaskStore
from opensam.model.segmenter import OpenSamModel, build_model
from opensam.parallel.context import init_runtime
from opensam.runtime import atomic_path, run_main, seed_everything

log = logging.getLogger("stages.zeroshot")
Results = dict[str, dict[str, float]]

THESIS = {  # thesis Table 3.1 (METHOD.md), mIoU % on 47 train images, SAM ViT-H
    "baseline": {"miou": 48.92},
    "nu": {"pps8": 75.88, "pps16": 85.12, "pps32": 86.98, "pps64": 86.87},
    "nu_mra100": {"pps8": 75.87, "pps16": 85.09, "pps32": 86.91, "pps64": 86.62},
    "pm_mra100": {"pps8": 75.45, "pps16": 74.11, "pps32": 71.78, "pps64": 71.32},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared", "ablation", "out", "table", "plot"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def select_ids(train: list[str], stores: list[MaskStore], count: int, size: int) -> list[str]:
    """The first ``count`` train ids present in every store (stores must match ``size``)."""
    for store in stores:
        if store.attrs.get("image_size") != size:
            raise InputError(f"{store.path}: masks are not {size}x{size} like the images")
    held = [set(store.ids()) for store in stores]
    ids = [i for i in train if all(i in h for h in held)][:count]
    if not ids:
        raise InputError(f"{stores[0].path.parent}: no train image is in every ablation store")
    return ids


def score(
    model: OpenSamModel,
    emb: torch.Tensor,
    labels: dict[str, torch.Tensor],
    store: MaskStore | None,
    variant: str = "nu",
) -> float:
    """mIoU (%) of one variant over all images (``store`` None: the per-pixel baseline)."""
    conf = np.zeros((model.num_classes,) * 2, np.int64)
    for i, (image_id, label) in enumerate(labels.items()):
        masks = None if store is None else store.read(image_id).masks
        pred = model.predict_embedding(emb[i], (label.shape[0], label.shape[1]), masks, variant)
        conf += confusion_matrix(pred, label, model.num_classes)
    return round(100.0 * miou_from_confusion(conf), 2)


def run_ablation(args: argparse.Namespace, params: Params) -> tuple[Results, int]:
    """All variants' mIoU (%) and the number of images scored."""
    splits = load_splits(args.prepared)
    if list(splits.get("classes", params.class_names)) != params.class_names:
        raise InputError(f"{args.prepared}/splits.json: classes differ from {args.params}")
    ab = params.ablation
    keys = list(product(ab.pps, ab.min_region_area))
    stores = {(p, a): MaskStore(args.ablation / f"pps{p}_mra{a}.h5") for p, a in keys}
    size = int(splits["image_size"])
    ids = select_ids(list(splits["train"]), list(stores.values()), ab.images, size)
    if len(ids) < ab.images:
        log.warning("only %d of %d ablation images are in every store", len(ids), ab.images)
    model = build_model(params.clip, params.prompts)
    emb = model.embed_many([read_image(args.prepared / "images" / f"{i}.png") for i in ids])
    labels = {i: read_label(args.prepared / "labels" / f"{i}.png", (size, size)) for i in ids}
    results: Results = {"baseline": {"miou": score(model, emb, labels, None)}}
    areas = ab.min_region_area
    variants = [("nu" if a == 0 else f"nu_mra{a}", a, "nu") for a in areas]
    variants += [(f"pm_mra{a}", a, "pm") for a in areas if a]
    jobs = [(key, p, a, v) for key, a, v in variants for p in ab.pps]
    for key, pps, area, variant in tqdm(jobs, desc="variants", unit="variant"):
        store = stores[pps, area]
        results.setdefault(key, {})[f"pps{pps}"] = score(model, emb, labels, store, variant)
    log.info("zero-shot mIoU (%%) on %d images: %s", len(ids), results)
    return results, len(ids)


def format_table(results: Results, pps: tuple[int, ...]) -> str:
    """Markdown laid out like thesis Table 3.1, each row followed by the thesis's numbers."""
    names = {"baseline": "OpenCLIP alone", "nu": "+ SAM, NU"}
    names |= {k: f"+ SAM, {k[:2].upper()}, MMRA={k[6:]}" for k in results if "_mra" in k}
    cols, heads = ["miou"] + [f"pps{p}" for p in pps], ["baseline"] + [f"pps={p}" for p in pps]
    return format_miou_table(results, cols, ["mIoU (%)", *heads], names, THESIS)


def format_csv(results: Results, pps: tuple[int, ...]) -> str:
    """One row per pps, one column per variant (``pps,nu,nu_mra100,pm_mra100``)."""
    keys = [k for k in results if k != "baseline"]
    rows = ["pps," + ",".join(keys)]
    rows += [f"{p}," + ",".join(str(results[k].get(f"pps{p}", "")) for k in keys) for p in pps]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.seed)
    init_runtime(params.runtime)  # one process: not launched through torchrun
    results, count = run_ablation(args, params)
    pps, clip = params.ablation.pps, params.clip
    note = (
        f"Zero-shot mIoU on {count} train images; CLIP {clip.model} "
        f"({clip.pretrained or 'random init'}). Thesis: convnext_base_w LAION-2B + SAM ViT-H."
    )
    texts = {
        args.out: json.dumps(results, indent=2) + "\n",
        args.table: note + "\n\n" + format_table(results, pps),
        args.plot: format_csv(results, pps),
    }
    for path, text in texts.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return 0


if __name__ == "__main__":
    run_main(main)
