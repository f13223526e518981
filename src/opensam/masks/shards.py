"""The mask store computed by several torchrun ranks: disjoint slices, one shard each, one merge.

Rank r of w takes ``ids[r::w]`` and writes its own resumable shard ``.<name>.rank<r>of<w>``
(through :class:`MaskStoreWriter`, so a killed rank leaves ``.<name>.rank<r>of<w>.partial``
and the next run with the same w resumes it). Images already done in the single-process partial
``.<name>.partial`` are not recomputed. Rank 0 then merges the shards into that partial in
``ids`` order and renames it to the final path: the per-image datasets equal the one-process
run's (the same generator on the same image, written by the same writer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from opensam.masks.arrays import MaskGenerator
from opensam.masks.store import (
    AttrValue,
    MaskStore,
    MaskStoreWriter,
    completed_images,
    partial_path,
    summarize_store,
    validate_store,
)
from opensam.masks.workers import write_missing
from opensam.parallel.context import Runtime, barrier
from opensam.runtime import remove_path

log = logging.getLogger(__name__)


def shard_path(out_path: Path, rank: int, world: int) -> Path:
    """Rank ``rank``'s finished shard beside ``out_path``: ``data/.masks.h5.rank0of2``."""
    return out_path.with_name(f".{out_path.name}.rank{rank}of{world}")


def _compute_shard(
    shard: Path,
    todo: Sequence[str],
    paths: Mapping[str, Path],
    digests: Mapping[str, str],
    generator: MaskGenerator | Callable[[], MaskGenerator],
    attrs: Mapping[str, AttrValue],
    originals: Mapping[str, Path] | None,
    rank: int,
    workers: int,
) -> None:
    size = int(attrs["image_size"])
    with MaskStoreWriter(shard, attrs, todo) as writer:
        write_missing(
            writer, todo, paths, digests, generator, size, originals, f"rank {rank}", workers
        )


def _merge(
    out_path: Path,
    ids: Sequence[str],
    digests: Mapping[str, str],
    attrs: Mapping[str, AttrValue],
    world: int,
) -> None:
    """Rank 0: copy every image the partial lacks from its rank's shard, in ``ids`` order."""
    with MaskStoreWriter(out_path, attrs, ids) as writer:
        done = writer.done_ids()
        stores = [MaskStore(shard_path(out_path, r, world)) for r in range(world)]
        try:
            for index, image_id in enumerate(tqdm(ids, desc="merge shards", unit="img")):
                if done.get(image_id) != digests[image_id]:
                    masks = stores[index % world].read(image_id)
                    writer.write(image_id, masks, digests[image_id])
        finally:
            for store in stores:
                store.close()
    for r in range(world):
        remove_path(shard_path(out_path, r, world))


def compute_sharded(
    out_path: Path,
    ids: Sequence[str],
    paths: Mapping[str, Path],
    digests: Mapping[str, str],
    generator: MaskGenerator | Callable[[], MaskGenerator],
    attrs: Mapping[str, AttrValue],
    originals: Mapping[str, Path] | None,
    runtime: Runtime,
    workers: int = 1,
) -> dict[str, float]:
    """:func:`opensam.masks.generators.compute_mask_store` across ``runtime.world`` ranks
    (every rank calls it; ``workers`` CPU-generator threads per rank); returns the finished
    store's summary on every rank."""
    rank, world = runtime.rank, runtime.world
    if not validate_store(out_path, attrs, ids, digests):
        barrier(runtime)  # every rank has looked at out_path before rank 0 removes it
        if runtime.is_main and (out_path.exists() or out_path.is_symlink()):
            log.info("%s: removing the stale store before rebuilding it", out_path)
            remove_path(out_path)
        in_partial = completed_images(partial_path(out_path), attrs)
        mine = [i for n, i in enumerate(ids) if n % world == rank]
        todo = [i for i in mine if in_partial.get(i) != digests[i]]
        barrier(runtime)  # the partial is closed everywhere before rank 0 writes it
        shard = shard_path(out_path, rank, world)
        _compute_shard(shard, todo, paths, digests, generator, attrs, originals, rank, workers)
        barrier(runtime)
        if runtime.is_main:
            _merge(out_path, ids, digests, attrs, world)
    else:
        log.info("%s: up to date, reusing it", out_path)
    barrier(runtime)
    summary = summarize_store(out_path)
    if runtime.is_main:
        log.info(
            "%s: %d images from %d ranks, %.0f bytes per image",
            out_path,
            summary["images"],
            world,
            summary["bytes_per_image"],
        )
    return summary
