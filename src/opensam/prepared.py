"""The prepared data set (``data/prepared/``): one owner for its layout, ``splits.json`` and the
class list.

Layout (written by :mod:`opensam.data.prepare`)::

    images/<id>.png          RGB uint8, image_size x image_size, every labelled and unlabelled image
    labels/<id>.png          mode L class ids, 255 = ignore (labelled images only)
    unlabelled_gt/<id>.png   hidden ground truth of unlabelled images, when the source has it
    splits.json              {"image_size", "classes", "colors", "train", "val", "test",
                              "unlabelled", "unlabelled_gt", "sources"}

``unlabelled`` is in a fixed seeded order: the pool for a ratio r is its first ``r * len(train)``
ids. Every reader goes through :func:`read_prepared`; every class-list comparison through
:func:`check_classes`; every overlay colour through :func:`class_colors`.
"""

from __future__ import annotations

import colorsys
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from opensam.errors import InputError, quote
from opensam.runtime import read_json

SPLITS_NAME = "splits.json"
IMAGES_DIR, LABELS_DIR, HIDDEN_GT_DIR = "images", "labels", "unlabelled_gt"
LABELLED_SPLITS = ("train", "val", "test")
RGB = tuple[int, int, int]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A prepared data set: ids per split, image size, classes and their labelmap colours."""

    root: Path
    image_size: int
    classes: tuple[str, ...]
    colors: tuple[RGB, ...] = ()
    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    unlabelled: tuple[str, ...] = ()
    has_hidden_gt: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)
    epoch_images: int = 0  # labelled images a training epoch draws (0: len(train))

    @property
    def train_epoch_ids(self) -> tuple[str, ...]:
        """The train ids one training epoch draws: ``train``, cycled up to ``epoch_images``.

        A cut train split (:meth:`labelled_subset`) keeps the whole split's epoch, so a run
        on 15 of 60 images takes the same steps and schedule as one on all 60, each image
        drawn four times an epoch (each draw augmented anew): rows of the labelled-count
        curve then differ in their labels, not in how long they train."""
        n = len(self.train)
        if n == 0 or self.epoch_images <= n:
            return self.train
        return tuple(self.train[i % n] for i in range(self.epoch_images))

    @property
    def splits_path(self) -> Path:
        return self.root / SPLITS_NAME

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def labels_dir(self) -> Path:
        return self.root / LABELS_DIR

    @property
    def hidden_gt_dir(self) -> Path:
        return self.root / HIDDEN_GT_DIR

    def image_path(self, image_id: str) -> Path:
        return self.images_dir / f"{image_id}.png"

    def label_path(self, image_id: str) -> Path:
        return self.labels_dir / f"{image_id}.png"

    def ids(self, split: str) -> list[str]:
        """The ids of ``split`` (train, val, test or unlabelled)."""
        if split not in (*LABELLED_SPLITS, "unlabelled"):
            raise KeyError(split)
        return list(getattr(self, split))

    def split_ids(self, splits: Sequence[str] = LABELLED_SPLITS) -> dict[str, list[str]]:
        return {s: self.ids(s) for s in splits}

    def pool_ids(self, ratio: int) -> list[str]:
        """The unlabelled pool of ``ratio``: the first ``ratio * len(train)`` unlabelled ids."""
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        wanted = ratio * len(self.train)
        if wanted > len(self.unlabelled):
            log.warning(
                "ratio %d wants %d unlabelled images, only %d exist",
                ratio,
                wanted,
                len(self.unlabelled),
            )
        return list(self.unlabelled[:wanted])

    def labelled_subset(self, n: int | None, source: str = "params.yaml") -> Prepared:
        """This data set with its train split cut to its first ``n`` ids (``None``: all of
        them); val, test and the unlabelled order are untouched, so the pool of a ratio is the
        first ``ratio * n`` unlabelled ids, and an epoch still draws as many images as the
        whole split (:attr:`train_epoch_ids`). InputError (naming ``source``) if ``n`` is larger
        than the train split."""
        if n is None:
            return self
        if not 1 <= n <= len(self.train):
            raise InputError(
                f"{source}: labelled_train: must be in 1..{len(self.train)} (the train split of "
                f"{self.splits_path}), got {n}"
            )
        return replace(
            self, train=self.train[:n], epoch_images=max(self.epoch_images, len(self.train))
        )

    def check_classes(self, names: Sequence[str], source: str) -> None:
        """InputError unless ``names`` (from ``source``) are this data set's classes, in order."""
        check_classes(self.classes, names, str(self.splits_path), source)


def class_fractions(histogram: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """(C,) int64 pixel counts -> {class: percent of non-ignored pixels, 2 decimals}."""
    total = int(histogram.sum())
    return {
        name: round(100.0 * int(n) / total, 2) if total else 0.0
        for name, n in zip(class_names, histogram, strict=True)
    }


def check_classes(expected: Sequence[str], found: Sequence[str], where: str, source: str) -> None:
    """The one class-list check: ``found`` (from ``source``) must equal ``expected`` in order.

    The message names ``where`` (the file whose classes are authoritative) and both lists."""
    if list(expected) != list(found):
        raise InputError(
            f"{where}: classes {list(expected)} differ from {source} {list(found)} "
            "(same names in the same order are needed; rerun the stages after changing classes)"
        )


def _id_list(data: Mapping[str, Any], key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise InputError(f"{path}: {quote(key)} must be a list of image ids")
    return tuple(value)


def _colors(data: Mapping[str, Any], n: int, path: Path) -> tuple[RGB, ...]:
    raw = data.get("colors") or []
    ok = isinstance(raw, list) and len(raw) in (0, n)
    ok = ok and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in raw
    )
    if not ok:
        raise InputError(f"{path}: 'colors' must be one [r, g, b] (0-255) per class")
    return tuple((int(c[0]), int(c[1]), int(c[2])) for c in raw)


def read_prepared(root: Path) -> Prepared:
    """Read and check ``<root>/splits.json``; InputError (naming the file) if it is unusable."""
    root = Path(root)
    path = root / SPLITS_NAME
    data = read_json(path, "run the prepare stage")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    size = data.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InputError(f"{path}: 'image_size' must be a positive integer, got {quote(size)}")
    classes = data.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{path}: 'classes' must be a list of names")
    sources = data.get("sources") or {}
    if not isinstance(sources, dict):
        raise InputError(f"{path}: 'sources' must be a mapping of id to photo path")
    return Prepared(
        root=root,
        image_size=size,
        classes=tuple(classes),
        colors=_colors(data, len(classes), path),
        train=_id_list(data, "train", path),
        val=_id_list(data, "val", path),
        test=_id_list(data, "test", path),
        unlabelled=_id_list(data, "unlabelled", path),
        has_hidden_gt=bool(data.get("unlabelled_gt", False)),
        sources={str(k): str(v) for k, v in sources.items() if isinstance(v, str)},
    )


def write_splits(root: Path, index: Mapping[str, Any]) -> None:
    """Write ``<root>/splits.json`` (``root`` is a directory being built, not yet final)."""
    (Path(root) / SPLITS_NAME).write_text(json.dumps(index, indent=1) + "\n")


def class_colors(
    colors: Sequence[Sequence[int] | None], fallback: Sequence[Sequence[int]] | None = None
) -> np.ndarray:
    """The one colour rule, (C, 3) uint8: the params colour ``colors[c]`` when set, else the
    training data set's labelmap colour ``fallback[c]``, else evenly spaced hues."""
    out = np.zeros((len(colors), 3), dtype=np.uint8)
    for c, colour in enumerate(colors):
        if colour is None and fallback is not None and c < len(fallback):
            colour = fallback[c]
        if colour is None:  # evenly spaced hues, deterministic
            rgb = colorsys.hsv_to_rgb(c / max(1, len(colors)), 0.8, 0.9)
            colour = [round(255 * v) for v in rgb]
        out[c] = np.asarray(colour, dtype=np.uint8)[:3]
    return out
