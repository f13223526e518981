"""SegDataset, collate_batch and make_loader on a tiny synthetic prepared folder + mask store.

The scene project (``write_tiny_project``, ``scene``, ``region_masks``) is in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import region_masks, scene, write_tiny_project
from PIL import Image

from opensam.constants import IGNORE_INDEX
from opensam.data.augment import Augmenter, warp_masks
from opensam.data.datasets import (
    SegDataset,
    collate_batch,
    make_loader,
    make_train_loaders,
    set_loader_epoch,
)
from opensam.errors import InputError
from opensam.masks.arrays import MaskSet, boxes_xywh
from opensam.masks.store import MaskStoreWriter
from opensam.model.aggregation import (
    nu_pool_weights,
    pool_weights_from_winner,
    prepare_mask_inputs,
    winner_index,
)

GRID = (2, 2)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_project(tmp_path_factory.mktemp("tiny"), size=48)


def ids(project: dict[str, Path], split: str) -> list[str]:
    return list(json.loads(project["splits"].read_text())[split])


def test_item_shapes_and_dtypes(project: dict[str, Path]) -> None:
    ds = SegDataset(
        project["prepared"],
        ids(project, "train"),
        project["prepared"] / "labels",
        project["masks"],
        GRID,
    )
    item = ds[0]
    assert item["id"] == ids(project, "train")[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].shape == (48, 48) and item["label"].dtype == torch.int64
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    m = item["pool_weights"].shape[0]
    assert m > 0 and item["pool_weights"].shape == (m, *GRID)
    assert item["pool_weights"].dtype == torch.float32
    assert item["winner"].shape == (48, 48) and item["winner"].dtype == torch.int64
    assert int(item["winner"].max()) < m


def test_no_labels_and_no_masks(project: dict[str, Path]) -> None:
    ds = SegDataset(project["prepared"], ids(project, "unlabelled"), None, None, GRID)
    item = ds[1]
    assert bool((item["label"] == IGNORE_INDEX).all())
    assert item["pool_weights"].shape == (0, *GRID)
    assert bool((item["winner"] == -1).all())


def test_unaugmented_winner_is_the_stores(project: dict[str, Path]) -> None:
    from opensam.masks.store import MaskStore

    store = MaskStore(project["masks"])
    ds = SegDataset(project["prepared"], ids(project, "train"), None, project["masks"], GRID)
    for i, image_id in enumerate(ds.ids):
        item = ds[i]
        masks = store.read(image_id).masks
        assert torch.equal(item["winner"], torch.from_numpy(store.read_winner(image_id)).long())
        assert torch.equal(item["winner"], winner_index(masks))
        ref = prepare_mask_inputs(masks, GRID).pool_weights
        assert torch.allclose(item["pool_weights"], ref)


@pytest.mark.parametrize("index", range(4))
def test_augmented_masks_match_augmented_label(project: dict[str, Path], index: int) -> None:
    ds = SegDataset(
        project["prepared"],
        ids(project, "train"),
        project["prepared"] / "labels",
        project["masks"],
        GRID,
        augment=Augmenter(),
        seed=3,
    )
    ds.set_epoch(index)
    item = ds[index % len(ds)]
    label, winner = item["label"], item["winner"]
    # the masks are the label's class regions, so each painted mask sees one class only
    for m in torch.unique(winner[winner >= 0]).tolist():
        values = torch.unique(label[(winner == m) & (label != IGNORE_INDEX)])
        assert len(values) <= 1, (m, values.tolist())
    assert bool((winner >= 0)[label != IGNORE_INDEX].all())
    assert item["pool_weights"].shape[0] > 0


def test_augmentation_is_seeded_per_epoch(project: dict[str, Path]) -> None:
    def item(seed: int, epoch: int) -> dict[str, Any]:
        ds = SegDataset(
            project["prepared"],
            ids(project, "train"),
            project["prepared"] / "labels",
            project["masks"],
            GRID,
            augment=Augmenter(),
            seed=seed,
        )
        ds.set_epoch(epoch)
        return ds[2]

    a, b, c = item(1, 0), item(1, 0), item(1, 1)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["winner"], b["winner"])
    assert not torch.equal(a["image"], c["image"])


def test_collate_pads_pool_weights() -> None:
    def fake(m: int) -> dict[str, Any]:
        pool = torch.rand(m, 2, 2) + 0.1
        return {
            "id": f"x{m}",
            "image": torch.rand(3, 8, 8),
            "label": torch.zeros(8, 8).long(),
            "pool_weights": pool,
            "winner": torch.full((8, 8), -1),
        }

    items = [fake(2), fake(0), fake(5)]
    batch = collate_batch(items)
    assert batch["id"] == ["x2", "x0", "x5"]
    assert batch["pool_weights"].shape == (3, 5, 2, 2)
    assert torch.equal(batch["pool_weights"][0, :2], items[0]["pool_weights"])
    assert bool((batch["pool_weights"][0, 2:] == 0).all())
    assert bool((batch["pool_weights"][1] == 0).all())
    assert batch["image"].shape == (3, 3, 8, 8) and batch["winner"].shape == (3, 8, 8)


def test_image_with_no_masks(project: dict[str, Path], tmp_path: Path) -> None:
    first, second = ids(project, "val")[:2]
    attrs = {
        "generator": "test",
        "model": "none",
        "checkpoint_sha256": "",
        "pps": 4,
        "min_region_area": 0,
        "image_size": 48,
    }
    with MaskStoreWriter(tmp_path / "m.h5", attrs) as writer:
        writer.write(first, MaskSet.empty(48, 48))
        label = np.asarray(Image.open(project["prepared"] / "labels" / f"{second}.png"))
        writer.write(second, region_masks(label))
    for augment in (None, Augmenter()):
        ds = SegDataset(
            project["prepared"],
            [first, second],
            project["prepared"] / "labels",
            tmp_path / "m.h5",
            GRID,
            augment=augment,
        )
        batch = next(iter(make_loader(ds, 2, shuffle=False, seed=0)))
        assert bool((batch["winner"][0] == -1).all())
        assert bool((batch["pool_weights"][0] == 0).all())
        assert batch["pool_weights"].shape[1] == len(region_masks(label))


def _epoch_batches(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> list[Any]:
    set_loader_epoch(loader, seed, epoch)
    return [(b["id"], b["image"], b["winner"]) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_is_deterministic_per_epoch(project: dict[str, Path], workers: int) -> None:
    def loader(num_workers: int) -> torch.utils.data.DataLoader:
        ds = SegDataset(
            project["prepared"],
            ids(project, "train"),
            project["prepared"] / "labels",
            project["masks"],
            GRID,
            augment=Augmenter(),
            seed=5,
        )
        return make_loader(ds, 4, shuffle=True, seed=5, num_workers=num_workers)

    ref = _epoch_batches(loader(0), 5, 1)
    again = _epoch_batches(loader(workers), 5, 1)
    assert [r[0] for r in ref] == [a[0] for a in again]
    for r, a in zip(ref, again, strict=True):
        assert torch.equal(r[1], a[1]) and torch.equal(r[2], a[2])
    other = [_epoch_batches(loader(0), 5, e) for e in (2, 3)]
    assert any([b[0] for b in o] != [r[0] for r in ref] for o in other)


def test_make_train_loaders(project: dict[str, Path], tmp_path: Path) -> None:
    train, pseudo, val = make_train_loaders(
        project["prepared"],
        ids(project, "train"),
        ids(project, "val"),
        project["masks"],
        GRID,
        batch_size=4,
        seed=0,
        augment=None,
        pseudo=(ids(project, "unlabelled"), tmp_path),
    )
    assert pseudo is not None and val is not None
    sizes = [len(loader.dataset) for loader in (train, pseudo, val)]  # type: ignore[arg-type]
    assert sizes == [6, 6, 3]
    assert pseudo.dataset.label_dir == tmp_path / "labels"  # type: ignore[attr-defined]
    _, no_pseudo, no_val = make_train_loaders(
        project["prepared"], ids(project, "train"), [], None, GRID, 4, 0
    )
    assert no_pseudo is None and no_val is None


def test_bad_inputs_name_the_file(project: dict[str, Path], tmp_path: Path) -> None:
    ds = SegDataset(project["prepared"], ["nope"], None, None, GRID)
    with pytest.raises(InputError, match="nope.png"):
        ds[0]
    labels = tmp_path / "labels"
    labels.mkdir()
    first = ids(project, "train")[0]
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(labels / f"{first}.png")
    ds = SegDataset(project["prepared"], [first], labels, None, GRID)
    with pytest.raises(InputError, match=f"{first}.png: label size"):
        ds[0]
    ds = SegDataset(project["prepared"], [first], None, tmp_path / "missing.h5", GRID)
    with pytest.raises(InputError, match="missing.h5"):
        ds[0]


def partition_masks(label: np.ndarray) -> MaskSet:
    """Disjoint masks (like superpixels): each class region cut into quadrants."""
    h, w = label.shape
    masks = []
    for c in range(4):
        for qy in (slice(0, h // 2), slice(h // 2, h)):
            for qx in (slice(0, w // 2), slice(w // 2, w)):
                m = np.zeros((h, w), bool)
                m[qy, qx] = label[qy, qx] == c
                masks.append(m)
    stack = np.stack([m for m in masks if m.any()])
    area = stack.reshape(len(stack), -1).sum(1)
    order = np.argsort(-area, kind="stable")
    n = len(stack)
    return MaskSet(
        stack[order],
        area[order].astype(np.int32),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        boxes_xywh(stack[order]),
    )


@pytest.mark.parametrize("grid", [(2, 2), (3, 5)])
def test_pool_weights_from_winner_equal_the_stacks(grid: tuple[int, int]) -> None:
    label = scene(np.random.default_rng(4), 40)[1]
    masks = torch.from_numpy(partition_masks(label).masks)
    got = pool_weights_from_winner(winner_index(masks), masks.shape[0], grid)
    assert torch.allclose(got, nu_pool_weights(masks, grid), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("augment", [False, True])
def test_disjoint_masks_take_the_winner_path_with_the_same_result(
    project: dict[str, Path], tmp_path: Path, augment: bool
) -> None:
    train = ids(project, "train")[:3]
    attrs = {
        "generator": "test",
        "model": "none",
        "checkpoint_sha256": "",
        "pps": 4,
        "min_region_area": 0,
        "image_size": 48,
    }
    stacks = {}
    with MaskStoreWriter(tmp_path / "d.h5", attrs) as writer:
        for image_id in train:
            label = np.asarray(Image.open(project["prepared"] / "labels" / f"{image_id}.png"))
            stacks[image_id] = partition_masks(label)
            writer.write(image_id, stacks[image_id])
    aug = Augmenter() if augment else None
    labels = project["prepared"] / "labels"
    ds = SegDataset(project["prepared"], train, labels, tmp_path / "d.h5", GRID, augment=aug)
    ds.set_epoch(2)
    for epoch_pass in range(2):  # the first pass finds the masks disjoint, the second uses it
        for i, image_id in enumerate(train):
            item = ds[i]
            masks = torch.from_numpy(stacks[image_id].masks)
            if aug is not None:
                image = torch.zeros(3, 48, 48)
                index = aug(image, None, None, np.random.default_rng([0, 2, i])).source_index
                assert index is not None
                masks = warp_masks(masks, index)
            ref = prepare_mask_inputs(masks, GRID)
            assert torch.equal(item["winner"], ref.winner), (epoch_pass, image_id)
            assert torch.allclose(item["pool_weights"], ref.pool_weights, atol=1e-6)
    assert set(ds._disjoint) == set(train)
