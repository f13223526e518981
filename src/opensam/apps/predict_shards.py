"""``predict_photos`` across torchrun ranks: whole batches per rank, merged into one folder.

Every rank drops the photos already predicted in the output, cuts the rest into the
one-process batches and takes batches b = r, r + w, ... (:mod:`opensam.parallel.sharding`),
predicting them into its own folder ``<out>.rank<r>of<w>/`` with :func:`predict_photos`, which
resumes a killed rank from that folder's CSV. Rank 0 then moves the class maps and overlays
into the output, merges the CSV rows and failures, and removes the shard folders. One process
is a plain :func:`predict_photos` call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from opensam.apps.predict import (
    FAILED_NAME,
    LABELS_DIR,
    OVERLAYS_DIR,
    Photo,
    PredictResult,
    StageTimes,
    is_done,
    predict_photos,
)
from opensam.apps.predictions_csv import read_rows, write_rows
from opensam.masks.generators import MaskGenerator
from opensam.parallel.context import (
    Runtime,
    all_gather_objects,
    broadcast_object,
    current_runtime,
)
from opensam.parallel.sharding import own_batches
from opensam.runtime import atomic_path, remove_path


def shard_folder(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir.with_name(f"{out_dir.name}.rank{rank}of{world}")


def _merge(
    out_dir: Path,
    photos: Sequence[Photo],
    class_names: Sequence[str],
    results: list[PredictResult],
    world: int,
    skipped: int,
) -> PredictResult:
    """Rank 0: move every shard into ``out_dir``; the combined result of all ranks."""
    rows = read_rows(out_dir, class_names)
    for r in range(world):
        shard = shard_folder(out_dir, r, world)
        for sub in (LABELS_DIR, OVERLAYS_DIR):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
            for path in sorted((shard / sub).glob("*")):
                os.replace(path, out_dir / sub / path.name)
        rows.update(read_rows(shard, class_names))
    write_rows(out_dir, rows.values(), class_names)
    failed = [f for res in results for f in res.failed]
    with atomic_path(out_dir / FAILED_NAME) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in failed))
    for r in range(world):
        remove_path(shard_folder(out_dir, r, world))
    times = StageTimes()
    for res in results:
        for key in vars(times):
            setattr(times, key, getattr(times, key) + getattr(res.times, key))
    return PredictResult(
        [rows[p.id] for p in photos if p.id in rows],
        sum(r.processed for r in results),
        skipped + sum(r.skipped for r in results),
        failed,
        max(r.seconds for r in results),
        times,
    )


def predict_photos_sharded(
    model: nn.Module,
    photos: Sequence[Photo],
    out_dir: Path,
    class_names: Sequence[str],
    colors: np.ndarray,
    image_size: int,
    masks: MaskGenerator | None = None,
    batch_size: int = 8,
    low_conf: float = 0.5,
    overwrite: bool = False,
    refused: Sequence[tuple[str, str]] = (),
    runtime: Runtime | None = None,
) -> PredictResult:
    """:func:`predict_photos` of ``photos`` into ``out_dir``, by every rank of a torchrun job
    (rank 0 writes ``out_dir``; the others only their shards). Returns the same result on
    every rank."""
    rt = runtime or current_runtime()
    if not rt.distributed:
        return predict_photos(
            model,
            photos,
            out_dir,
            class_names,
            colors,
            image_size,
            masks,
            batch_size,
            low_conf,
            overwrite,
            refused,
        )
    out_dir, todo_ids = Path(out_dir), set[str]()
    if rt.is_main:  # rank 0 decides: out_dir may be its fresh temporary folder
        done = {} if overwrite else read_rows(out_dir, class_names)
        todo_ids = {p.id for p in photos if overwrite or not is_done(out_dir, p, done)}
    todo_ids = broadcast_object(todo_ids, rt)
    todo = [p for p in photos if p.id in todo_ids]
    mine = [todo[i] for batch in own_batches(len(todo), batch_size, rt) for i in batch]
    shard = shard_folder(out_dir, rt.rank, rt.world)
    own_refused = refused if rt.is_main else ()
    result = predict_photos(
        model,
        mine,
        shard,
        class_names,
        colors,
        image_size,
        masks,
        batch_size,
        low_conf,
        refused=own_refused,
    )
    results = all_gather_objects(result, rt)  # also waits for every rank's shard
    skipped, merged = len(photos) - len(todo), None
    if rt.is_main:
        merged = _merge(out_dir, photos, class_names, results, rt.world, skipped)
    return broadcast_object(merged, rt) or result
