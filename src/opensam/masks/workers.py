"""CPU mask generators in worker threads: images in, encoded masks out, in input order.

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

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

from opensam.masks.arrays import EncodedMasks, MaskGenerator, encode_masks

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
