"""Torch datasets over prepared images, (pseudo-)labels and the region-mask store.

A :class:`SegDataset` item is a dict::

    "id"            str
    "image"         (3, H, W) float32 in [0, 1]
    "label"         (H, W) int64 class ids, 255 = ignore (all 255 without a label folder)
    "pool_weights"  (M, h, w) float32 NU pooling weights of the M masks on the embedding grid
    "winner"        (H, W) int64 index of the mask that paints each pixel, -1 = none

Augmentation is seeded per sample from ``(seed, epoch, index)``, so an epoch's data is the same
whatever the worker count or the order in which workers run (and a resumed run sees the same
data as an uninterrupted one).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from opensam.constants import IGNORE_INDEX
from opensam.data.augment import Augmenter, warp_label, warp_masks
from opensam.errors import InputError
from opensam.images import read_label_png
from opensam.masks.store import MaskStore
from opensam.model.aggregation import pool_weights_from_winner, prepare_mask_inputs
from opensam.parallel.context import current_runtime

log = logging.getLogger(__name__)

Item = dict[str, Any]


def read_image(path: Path) -> torch.Tensor:
    """A prepared RGB PNG as (3, H, W) float32 in [0, 1]."""
    try:
        with Image.open(path) as img:
            arr = np.array(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0).contiguous()


def read_label(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A mode-L class-id PNG as (H, W) int64; its size must equal ``shape`` (H, W)."""
    return torch.from_numpy(read_label_png(path, shape).astype(np.int64))


class SegDataset(Dataset[Item]):
    """Prepared images ``prepared/images/<id>.png`` with labels ``label_dir/<id>.png`` and the
    masks of store ``masks`` (None: no masks, M = 0 and winner all -1).

    ``grid_hw`` is the model's embedding grid (h, w) that the pooling weights live on;
    ``variant`` is the aggregation variant (``nu`` or ``pm``). ``augment`` (optional) is applied
    jointly to image, label and mask stack, seeded from ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        prepared: Path,
        ids: Sequence[str],
        label_dir: Path | None,
        masks: Path | None,
        grid_hw: tuple[int, int],
        variant: str = "nu",
        augment: Augmenter | None = None,
        seed: int = 0,
    ) -> None:
        self.prepared = Path(prepared)
        self.ids = [str(i) for i in ids]
        self.label_dir = Path(label_dir) if label_dir is not None else None
        self.masks_path = Path(masks) if masks is not None else None
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.variant = variant
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._store: MaskStore | None = None  # opened lazily, once per process / worker
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disjoint: dict[str, int] = {}  # id -> M, for stores whose masks never overlap

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation randomness of ``epoch`` (the loop calls this every epoch)."""
        self.epoch = epoch

    @property
    def store(self) -> MaskStore:
        if self._store is None:
            if self.masks_path is None:
                raise RuntimeError("this dataset has no mask store")
            if not self.masks_path.is_file():
                raise InputError(f"{self.masks_path}: mask store not found")
            self._store = MaskStore(self.masks_path)
        return self._store

    def __getitem__(self, index: int) -> Item:
        image_id = self.ids[index]
        image = read_image(self.prepared / "images" / f"{image_id}.png")
        shape = (image.shape[1], image.shape[2])
        if self.label_dir is not None:
            label = read_label(self.label_dir / f"{image_id}.png", shape)
        else:
            label = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
        if self.augment is None:
            pool, winner = self._mask_inputs(image_id, shape, None)
        else:
            out = self.augment(
                image, label, None, np.random.default_rng([self.seed, self.epoch, index])
            )
            assert out.label is not None
            image, label = out.image, out.label
            pool, winner = self._mask_inputs(image_id, shape, out.source_index)
        return {
            "id": image_id,
            "image": image,
            "label": label,
            "pool_weights": pool,
            "winner": winner,
        }

    def _read_masks(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """The stored masks of one image, (M, H, W) bool, checked against the image size."""
        try:
            masks = np.asarray(self.store.read(image_id).masks, dtype=bool)
        except KeyError:
            raise InputError(f"{self.masks_path}: no masks for image {image_id}") from None
        if masks.shape[1:] != shape:
            raise InputError(
                f"{self.masks_path}: masks of {image_id} are {masks.shape[1:]}, image is {shape}"
            )
        return masks

    def _mask_inputs(
        self, image_id: str, shape: tuple[int, int], source_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool weights (M, h, w) float32 and winner (H, W) int64 of the image's masks, moved by
        ``source_index`` (see :class:`opensam.data.augment.Augmented`) when given.

        Equal to ``prepare_mask_inputs`` of the moved stack. Disjoint masks (superpixels) are
        fully described by the store's winner map, so only that map is moved; overlapping
        masks (SAM) are moved as a stack. Unmoved results are cached, for both kinds (validation and
        evaluation repeat them).
        """
        if self.masks_path is None:
            h, w = self.grid_hw
            empty = torch.zeros((0, h, w), dtype=torch.float32)
            return empty, torch.full(shape, -1, dtype=torch.int64)
        if source_index is None and image_id in self._cache:
            return self._cache[image_id]
        if self.variant == "nu" and image_id in self._disjoint:
            winner = torch.from_numpy(self.store.read_winner(image_id).astype(np.int64))
            if source_index is not None:
                winner = warp_label(winner, source_index, fill=-1)
            pool = pool_weights_from_winner(winner, self._disjoint[image_id], self.grid_hw)
            if source_index is None:
                self._cache[image_id] = (pool, winner)
            return pool, winner
        masks = self._read_masks(image_id, shape)
        if self.variant == "nu" and int(masks.sum()) == int(masks.any(0).sum()):
            self._disjoint[image_id] = masks.shape[0]
            return self._mask_inputs(image_id, shape, source_index)
        stack = torch.from_numpy(masks)
        if source_index is not None:
            stack = warp_masks(stack, source_index)
        inputs = prepare_mask_inputs(stack, self.grid_hw, variant=self.variant)
        result = (inputs.pool_weights.float(), inputs.winner.long())
        if source_index is None:
            self._cache[image_id] = result
        return result


def collate_batch(items: Sequence[Item]) -> Item:
    """Stack items into a batch; pool_weights are padded with zero rows to (B, Mmax, h, w).

    Returns "id" list[str], "image" (B, 3, H, W) float32, "label" (B, H, W) int64,
    "pool_weights" (B, Mmax, h, w) float32 and "winner" (B, H, W) int64.
    """
    pools = [item["pool_weights"] for item in items]
    m_max = max((p.shape[0] for p in pools), default=0)
    h, w = pools[0].shape[1:]
    padded = torch.zeros((len(items), m_max, h, w), dtype=torch.float32)
    for i, pool in enumerate(pools):
        padded[i, : pool.shape[0]] = pool
    return {
        "id": [item["id"] for item in items],
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
        "pool_weights": padded,
        "winner": torch.stack([item["winner"] for item in items]),
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive python/numpy seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset[Item],
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A deterministic DataLoader: a seeded ``torch.Generator`` drives shuffling and worker seeds.

    Call :func:`set_loader_epoch` before each epoch to make the epoch's order a function of
    ``(seed, epoch)`` alone (what makes a resumed run match an uninterrupted one).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker,
        persistent_workers=False,  # workers must re-read the dataset's epoch each epoch
        pin_memory=current_runtime().cuda,  # then batches move with non_blocking copies
    )


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int, cycle: int = 0) -> None:
    """Reseed ``loader``'s shuffle and its dataset's augmentation for ``epoch`` (and ``cycle``,
    the number of times the loader was restarted within that epoch)."""
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch * 1_009 + cycle)
    if isinstance(loader.dataset, SegDataset) or hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch * 1_009 + cycle)  # SegDataset, or one it wraps


def make_train_loaders(
    prepared: Path,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    masks: Path | None,
    grid_hw: tuple[int, int],
    batch_size: int,
    seed: int,
    augment: Augmenter | None = None,
    pseudo: tuple[Sequence[str], Path] | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader | None, DataLoader | None]:
    """The (train, pseudo, val) loaders of one training run; pseudo / val are None when empty.

    Labels come from ``prepared/labels``; ``pseudo`` is (pool ids, pseudo-label folder holding
    ``labels/<id>.png``). Train and pseudo are shuffled and augmented with ``augment``.
    """
    labels = Path(prepared) / "labels"
    train = SegDataset(prepared, train_ids, labels, masks, grid_hw, augment=augment, seed=seed)
    train_loader = make_loader(train, batch_size, True, seed, num_workers)
    pseudo_loader = None
    if pseudo is not None and len(pseudo[0]):
        label_dir = Path(pseudo[1]) / "labels"
        pool = SegDataset(
            prepared, pseudo[0], label_dir, masks, grid_hw, augment=augment, seed=seed + 1
        )
        pseudo_loader = make_loader(pool, batch_size, True, seed + 1, num_workers)
    val = SegDataset(prepared, val_ids, labels, masks, grid_hw)
    val_loader = make_loader(val, batch_size, False, seed, num_workers) if len(val) else None
    return train_loader, pseudo_loader, val_loader


class Cycler:
    """Endless batches of a loader for one epoch; each restart within the epoch is reseeded (its
    cycle count), so a run that resumes at an epoch replays the same batches."""

    def __init__(self, loader: DataLoader, seed: int, epoch: int) -> None:
        self.loader, self.seed, self.epoch, self.cycle = loader, seed, epoch, 0
        set_loader_epoch(loader, seed, epoch)
        self.it: Iterator[Any] = iter(loader)

    def next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.cycle += 1
            set_loader_epoch(self.loader, self.seed, self.epoch, self.cycle)
            self.it = iter(self.loader)
            return next(self.it)


def labelled_batches(
    prepared: Path, ids: Sequence[str], grid_hw: tuple[int, int], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, H, W) float in [0, 1], labels (B, H, W) int64) of ``ids`` in order, not
    augmented and without masks (e.g. for class prototypes)."""
    dataset = SegDataset(prepared, ids, Path(prepared) / "labels", None, grid_hw)
    for batch in make_loader(dataset, batch_size, False, 0):
        yield batch["image"], batch["label"]
