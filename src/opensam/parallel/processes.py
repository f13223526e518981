"""CPU work (rendering, image encoding) mapped over worker processes on one machine.

The demo's generators (photos, caption scenes, boundary scenes) all draw one scene per task, in
a pure function of the task, so the result never depends on the worker count.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import cv2

T = TypeVar("T")
R = TypeVar("R")


def process_map(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    workers: int,
    *,
    ordered: bool = True,
    chunksize: int = 8,
    min_tasks: int = 1,
) -> Iterator[R]:
    """``map(fn, tasks)`` in ``workers`` processes, in task order unless ``ordered`` is False;
    in this process when ``workers`` <= 1 or there are fewer than ``min_tasks`` tasks.

    ``fn`` must be a module-level function (it is pickled). The workers start from a fresh
    forkserver process, never forked from this one: a thread pool that exists here (OpenCV's,
    torch's) would be a corrupt copy in a forked child and can deadlock it. Each worker runs
    OpenCV on one thread (one core per process). A calling script needs the usual
    ``if __name__ == "__main__":`` guard."""
    if workers <= 1 or len(tasks) < min_tasks:
        yield from map(fn, tasks)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers, cv2.setNumThreads, (1,)) as pool:
        if ordered:
            yield from pool.imap(fn, tasks, chunksize)
        else:
            yield from pool.imap_unordered(fn, tasks, chunksize)
