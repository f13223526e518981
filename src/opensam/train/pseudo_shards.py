"""Pseudo-labels computed by several torchrun ranks: whole batches per rank, merged by rank 0.

Rank r writes its batches (:mod:`opensam.parallel.sharding`: the one-process batches b = r,
r + w, ...) into its own shard folder beside the output, ``<out>.rank<r>of<w>/``:
``labels/<id>.png``, ``confidence/<id>.png`` and ``batches/<b>.json`` (the batch's ids and
statistics, written last and atomically). A killed rank resumes from its shard, skipping every
batch with a ``.json``. Rank 0 then moves the files into the output and sums the statistics in
batch order, so the files and the summary equal the one-process run's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from opensam.constants import IGNORE_INDEX
from opensam.eval.evaluation import predict_loader
from opensam.parallel.context import Runtime, barrier, broadcast_object
from opensam.parallel.sharding import shard_loader
from opensam.runtime import atomic_path, remove_path
from opensam.train.pseudo_format import CONFIDENCE_DIR, LABELS_DIR, confidence_to_uint8, hard_labels

log = logging.getLogger(__name__)

BATCHES_DIR = "batches"
Stats = tuple[float, int, int]  # (sum of max probabilities, ignored pixels, pixels)


def shard_dir(out_dir: Path, rank: int, world: int) -> Path:
    """Rank ``rank``'s shard folder beside ``out_dir``."""
    return out_dir.with_name(f"{out_dir.name}.rank{rank}of{world}")


def _save_png(array: torch.Tensor | object, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # type: ignore[arg-type]


def _predict_shard(
    model: nn.Module,
    loader: DataLoader,
    use_masks: bool,
    conf_threshold: float | None,
    shard: Path,
    runtime: Runtime,
) -> None:
    for sub in (LABELS_DIR, CONFIDENCE_DIR, BATCHES_DIR):
        (shard / sub).mkdir(parents=True, exist_ok=True)
    done = [int(p.stem) for p in (shard / BATCHES_DIR).glob("*.json") if p.stem.isdigit()]
    mine, numbers = shard_loader(loader, runtime, skip=done)
    log.info("rank %d: %d batch(es) to label, %d done", runtime.rank, len(numbers), len(done))
    for b, (ids, log_probs) in zip(numbers, predict_loader(model, mine, use_masks), strict=True):
        labels, conf = hard_labels(log_probs, conf_threshold)
        conf_u8 = confidence_to_uint8(conf)
        for i, image_id in enumerate(ids):
            _save_png(labels[i].numpy(), shard / LABELS_DIR / f"{image_id}.png")
            _save_png(conf_u8[i], shard / CONFIDENCE_DIR / f"{image_id}.png")
        ignored = int((labels == IGNORE_INDEX).sum())
        stats = {
            "ids": ids,
            "conf_sum": float(conf.double().sum()),
            "ignored": ignored,
            "pixels": labels.numel(),
        }
        with atomic_path(shard / BATCHES_DIR / f"{b}.json") as tmp:
            tmp.write_text(json.dumps(stats))


def _merge(out_dir: Path, world: int) -> Stats:
    """Rank 0: move every shard's files into ``out_dir``; the statistics summed by batch."""
    batches: list[tuple[int, dict]] = []
    for r in range(world):
        shard = shard_dir(out_dir, r, world)
        for path in (shard / BATCHES_DIR).glob("*.json"):
            batches.append((int(path.stem), json.loads(path.read_text())))
        for sub in (LABELS_DIR, CONFIDENCE_DIR):
            for path in sorted((shard / sub).glob("*.png")):
                os.replace(path, out_dir / sub / path.name)
    conf_sum, ignored, pixels = 0.0, 0, 0
    for _, stats in sorted(batches, key=lambda p: p[0]):  # the one-process summation order
        conf_sum += stats["conf_sum"]
        ignored, pixels = ignored + stats["ignored"], pixels + stats["pixels"]
    for r in range(world):
        remove_path(shard_dir(out_dir, r, world))
    return conf_sum, ignored, pixels


def predict_sharded(
    model: nn.Module,
    loader: DataLoader,
    use_masks: bool,
    conf_threshold: float | None,
    out_dir: Path,
    runtime: Runtime,
) -> Stats:
    """Every rank: label this rank's batches of ``loader`` into its shard; rank 0 merges them
    into ``out_dir`` (which holds ``labels/`` and ``confidence/``). Returns the statistics of
    all images on every rank, after the merge."""
    shard = shard_dir(Path(out_dir), runtime.rank, runtime.world)
    _predict_shard(model, loader, use_masks, conf_threshold, shard, runtime)
    barrier(runtime)
    stats = _merge(Path(out_dir), runtime.world) if runtime.is_main else (0.0, 0, 0)
    return broadcast_object(stats, runtime)
