"""Build ``data/prepared/``: downsampled images and labels, seeded splits, class statistics.

Format (docs/architecture.md, "Prepared data"): ``images/<id>.png`` (RGB, size x size, Lanczos),
``labels/<id>.png`` (mode L class ids, 255 = ignore, nearest), ``unlabelled_gt/<id>.png`` (only
with hidden ground truth) and ``splits.json``.

Speed: JPEG photos are decoded at a reduced DCT scale (``Image.draft``) that is still at least
``size`` x ``size``, then Lanczos-resized; PNGs are written with zlib level 1 (about 3x faster
than Pillow's default 6, ~12% larger); images are processed by a small process pool.
``bench/prepare.py`` compares this with full-size decoding in one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from opensam.config import SplitParams
from opensam.constants import IGNORE_INDEX
from opensam.data.importers import Export, LabelledItem, UnlabelledItem, warn_unknown_colours
from opensam.errors import InputError
from opensam.images import FileRef, resize_image, resize_label, save_png
from opensam.prepared import class_fractions, write_splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSizes:
    """Number of labelled images in each split."""

    train: int
    val: int
    test: int


def _split_count(value: float, n: int, name: str) -> int:
    if value < 0 or (value >= 1 and value != int(value)):
        raise InputError(
            f"data.split.{name}: expected a count or a fraction in (0, 1), got {value}"
        )
    if value >= 1:
        return int(value)
    return math.floor(value * n + 1e-9)  # epsilon: 0.29 * 100 is 28.999999999999996


def resolve_split_sizes(n_labelled: int, split: SplitParams, source: str) -> SplitSizes:
    """Turn counts (>= 1, integral) or fractions (< 1, of ``n_labelled``, floored) into counts.

    Raises InputError naming ``source`` when the labelled images are fewer than asked for.
    """
    sizes = SplitSizes(*(_split_count(getattr(split, s), n_labelled, s) for s in SPLITS))
    total = sizes.train + sizes.val + sizes.test
    if total > n_labelled:
        raise InputError(
            f"{source}: {n_labelled} labelled images, but the split asks for "
            f"{sizes.train}+{sizes.val}+{sizes.test} = {total}"
        )
    return sizes


def make_splits(
    labelled_ids: Sequence[str], unlabelled_ids: Sequence[str], sizes: SplitSizes, seed: int
) -> dict[str, list[str]]:
    """Seeded splits: {"train", "val", "test", "unlabelled"} -> ids.

    Labelled ids are sorted, shuffled with ``np.random.default_rng(seed)`` and sliced in the order
    train, val, test (leftovers are unused). The unlabelled ids get their own fixed seeded order
    (``default_rng([seed, 1])``), so the first ``ratio * n_train`` are the same for every ratio.
    """
    order = np.random.default_rng(seed).permutation(len(labelled_ids))
    shuffled = [sorted(labelled_ids)[i] for i in order]
    bounds = np.cumsum([0, sizes.train, sizes.val, sizes.test])
    out = {s: shuffled[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    pool = sorted(unlabelled_ids)
    out["unlabelled"] = [pool[i] for i in np.random.default_rng([seed, 1]).permutation(len(pool))]
    return out


@dataclass(frozen=True)
class _Task:
    id: str
    image: FileRef
    label: FileRef | None
    label_dir: str  # "labels" or "unlabelled_gt"


@dataclass(frozen=True)
class _Result:
    id: str
    histogram: np.ndarray | None  # (C,) int64 at image_size, None without a label
    unknown: int  # pixels of unknown colours mapped to 255
    label_name: str


_STATE: dict[str, Any] = {}  # per worker process: export, out_dir, size, draft


def _init_worker(export: Export, out_dir: Path, size: int, draft: bool) -> None:
    _STATE.update(export=export, out_dir=out_dir, size=size, draft=draft)


def _process(task: _Task) -> _Result:
    """Load, check, resize and write one image (and its label); runs in a worker."""
    export: Export = _STATE["export"]
    out_dir: Path = _STATE["out_dir"]
    size: int = _STATE["size"]
    rgb, full_size = export.read_image(task.image, min_size=size if _STATE["draft"] else None)
    save_png(resize_image(rgb, size), out_dir / "images" / f"{task.id}.png", compress_level=1)
    if task.label is None:
        return _Result(task.id, None, 0, "")
    ids, unknown = export.decode_label_file(task.label, expect_size=full_size)
    small = resize_label(ids, size)
    save_png(small, out_dir / task.label_dir / f"{task.id}.png", compress_level=1)
    valid = small[small != IGNORE_INDEX]
    histogram = np.bincount(valid, minlength=len(export.class_names)).astype(np.int64)
    return _Result(task.id, histogram, unknown, str(task.label))


def _run_tasks(
    tasks: list[_Task], export: Export, out_dir: Path, size: int, workers: int, draft: bool
) -> list[_Result]:
    """Process all tasks, in order, with a tqdm bar; ``workers`` > 1 uses a process pool."""
    args = (export, out_dir, size, draft)
    results: list[_Result] = []
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(tasks) < 2:
            _init_worker(*args)
            done: Iterator[_Result] = map(_process, tasks)
        else:
            pool = stack.enter_context(
                multiprocessing.get_context().Pool(workers, _init_worker, args)
            )
            done = pool.imap(_process, tasks, chunksize=4)
        # the bar is closed (a context) before an error message is printed
        with tqdm(done, total=len(tasks), desc="prepare", unit="img") as bar:
            results.extend(bar)
    return results


def _tasks(
    export: Export, splits: dict[str, list[str]], unlabelled: Sequence[UnlabelledItem]
) -> list[_Task]:
    by_id: dict[str, LabelledItem] = {it.id: it for it in export.items}
    used = [by_id[i] for s in SPLITS for i in splits[s]]
    tasks = [_Task(it.id, it.image, it.label, "labels") for it in used]
    return tasks + [_Task(it.id, it.image, it.gt, "unlabelled_gt") for it in unlabelled]


def prepare_dataset(
    export: Export,
    unlabelled: Sequence[UnlabelledItem],
    out_dir: Path,
    image_size: int,
    split: SplitParams,
    seed: int,
    workers: int = 1,
    reduced_decode: bool = True,
) -> dict[str, Any]:
    """Write the prepared data into ``out_dir`` (the caller makes it atomic); return the metrics.

    Every image is checked (readable, label of the same size, few unknown colours) and resized to
    ``image_size`` x ``image_size``. Returns ``metrics/data.json`` content: per split
    ``{"images": n, "class_fractions": {class: percent}}`` (unlabelled: fractions only with
    hidden ground truth for all of its images). ``workers`` > 1 uses a process pool;
    ``reduced_decode=False`` turns off JPEG DCT-scaled decoding (for comparison only).
    """
    sizes = resolve_split_sizes(len(export.items), split, export.source)
    splits = make_splits([it.id for it in export.items], [it.id for it in unlabelled], sizes, seed)
    has_gt = bool(unlabelled) and all(it.gt is not None for it in unlabelled)
    if not has_gt:
        if any(it.gt is not None for it in unlabelled):
            log.warning("hidden ground truth is incomplete; unlabelled_gt/ is not written")
        unlabelled = [UnlabelledItem(it.id, it.image, None) for it in unlabelled]
    for sub in ("images", "labels") + (("unlabelled_gt",) if has_gt else ()):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    tasks = _tasks(export, splits, unlabelled)
    results = {
        r.id: r for r in _run_tasks(tasks, export, out_dir, image_size, workers, reduced_decode)
    }
    warn_unknown_colours(
        [r.label_name for r in results.values() if r.unknown], export.unknown_colour_max_pixels
    )
    sources = {t.id: str(t.image) for t in sorted(tasks, key=lambda t: t.id)}
    index = {"image_size": image_size, "classes": export.class_names}
    index["colors"] = [list(export.colours[c]) for c in export.class_names]
    index.update(splits, unlabelled_gt=has_gt, sources=sources)
    write_splits(out_dir, index)
    return _data_metrics(splits, results, export.class_names, has_gt)


def _data_metrics(
    splits: dict[str, list[str]], results: dict[str, _Result], names: list[str], has_gt: bool
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for split, ids in splits.items():
        metrics[split] = {"images": len(ids)}
        if split != "unlabelled" or has_gt:
            hist = np.zeros(len(names), np.int64)
            for i in ids:
                hist += results[i].histogram  # type: ignore[arg-type]
            metrics[split]["class_fractions"] = class_fractions(hist, names)
    return metrics
