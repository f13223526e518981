"""Filling a mask store from a generator (:func:`write_missing`), with CPU generators in worker
threads: images in, encoded masks out, in input order.

The superpixel and region generators are CPU work (SLIC or graph segmentation, then bit packing)
that runs mostly outside the GIL (skimage's Cython loops, OpenCV, numpy), one image at a time.
On one rank they would use one core; here ``workers`` threads generate and encode images ahead of
the caller, which keeps writing the store in ``ids`` order, so the store's datasets equal the
one-thread run's (the same generator on the same image). Threads, not processes: no start-up
(a spawned process re-imports the stage and torch, about 4 s, more than a small store takes), no
pickling of 30 MB mask stacks, and the GIL is released where the time goes (measured:
``bench/mask_workers.py``). Across processes and machines the unit is a torchrun rank
(:mod:`opensam.masks.shards`); the two combine.

A generator opts in with a true ``thread_safe`` class attribute: its ``generate`` must keep no
state between calls.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from opensam.errors import InputError
from opensam.masks.arrays import EncodedMasks, MaskGenerator, MaskSet, encode_masks
from opensam.masks.store import MaskStoreWriter

log = logging.getLogger(__name__)

# One image's task: id, (S, S, 3) uint8 image, original photo (or None)
Task = tuple[str, np.ndarray, Path | None]
_AHEAD_PER_WORKER = 2  # tasks queued per thread: bounds the results waiting for the writer


def uses_workers(generator: object, workers: int) -> bool:
    """True when ``generator`` may run in ``workers`` > 1 threads (it opts in)."""
    return workers > 1 and bool(getattr(generator, "thread_safe", False))


def encode_in_workers(
    generator: MaskGenerator, tasks: Iterable[Task], workers: int
) -> Iterator[tuple[str, EncodedMasks]]:
    """``(id, encode_masks(generator.generate(image, original)))`` per task, in task order,
    computed by ``workers`` threads. Tasks are drawn lazily, a few per thread ahead of the
    consumer, so memory stays bounded however many images there are."""

    def encode(task: Task) -> tuple[str, EncodedMasks]:
        image_id, image, original = task
        return image_id, encode_masks(generator.generate(image, original), image.shape[:2])

    pending = iter(tasks)
    with ThreadPoolExecutor(workers, thread_name_prefix="masks") as pool:
        queue: deque[Future[tuple[str, EncodedMasks]]] = deque(
            pool.submit(encode, t) for t in islice(pending, workers * _AHEAD_PER_WORKER)
        )
        while queue:
            result = queue.popleft().result()
            if (task := next(pending, None)) is not None:  # keep the threads busy: one in, one out
                queue.append(pool.submit(encode, task))
            yield result


def read_prepared_image(path: Path, image_size: int) -> np.ndarray:
    """A prepared image as (S, S, 3) uint8 RGB; InputError if missing, unreadable or resized."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            array = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: prepared image not found") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(f"{path}: unreadable image ({exc.__class__.__name__})") from None
    if size != (image_size, image_size) or mode not in ("RGB", "RGBA", "L"):
        raise InputError(
            f"{path}: expected a {image_size}x{image_size} RGB image, got {size[0]}x{size[1]} "
            f"{mode} (rerun the prepare stage)"
        )
    return array


def write_missing(
    writer: MaskStoreWriter,
    ids: Sequence[str],
    paths: Mapping[str, Path],
    digests: Mapping[str, str],
    generator: MaskGenerator | Callable[[], MaskGenerator],
    size: int,
    originals: Mapping[str, Path] | None,
    name: str,
    workers: int = 1,
) -> None:
    """Generate and write every image of ``ids`` that ``writer``'s (partial) store lacks or
    holds for another source digest (a changed image is redone); the generator is built only
    when there is work. ``name`` labels the log line and the progress bar. A CPU generator
    (superpixels, regions) runs in ``workers`` threads if > 1 (:mod:`opensam.masks.workers`);
    the images are written in ``ids`` order either way, so the datasets do not depend on it."""
    done = writer.done_ids()
    todo = [i for i in ids if done.get(i) != digests[i]]
    log.info("%s: %d of %d image(s) to compute", name, len(todo), len(ids))
    if not todo:
        return
    gen = generator if isinstance(generator, MaskGenerator) else generator()

    def tasks() -> Iterator[Task]:
        for image_id in todo:
            original = originals.get(image_id) if originals else None
            yield image_id, read_prepared_image(paths[image_id], size), original

    results: Iterator[tuple[str, MaskSet | EncodedMasks]]
    if uses_workers(gen, workers) and len(todo) > 1:
        log.info("%s: %s in %d worker threads", name, type(gen).__name__, workers)
        results = encode_in_workers(gen, tasks(), workers)
    else:
        results = ((i, gen.generate(image, original)) for i, image, original in tasks())
    for image_id, masks in tqdm(results, total=len(todo), desc=f"masks {name}", unit="img"):
        writer.write(image_id, masks, digests[image_id])
