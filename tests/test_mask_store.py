"""The HDF5 mask store: round trips, winner, lazy reader, resume, corruption, validation."""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from opensam.errors import InputError
from opensam.masks.arrays import (
    MaskSet,
    boxes_xywh,
    compute_winner,
    encode_masks,
    pack_masks,
    unpack_masks,
)
from opensam.masks.store import MaskStore, MaskStoreWriter, partial_path, validate_store


def make_attrs(size: int, **over: object) -> dict:
    attrs = {
        "generator": "test",
        "model": "none",
        "checkpoint_sha256": "",
        "pps": 4,
        "min_region_area": 0,
        "image_size": size,
    }
    attrs.update(over)
    return attrs


def random_mask_set(rng: np.random.Generator, n: int, size: int) -> MaskSet:
    """n random rectangles-with-holes, sorted by area (largest first)."""
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        y0, x0 = rng.integers(0, size, 2)
        y1, x1 = y0 + rng.integers(1, size + 1), x0 + rng.integers(1, size + 1)
        masks[i, y0:y1, x0:x1] = rng.random((min(y1, size) - y0, min(x1, size) - x0)) < 0.8
    area = masks.reshape(n, size * size).sum(1).astype(np.int32)
    order = np.argsort(-area, kind="stable")
    return MaskSet(
        masks=masks[order],
        area=area[order],
        predicted_iou=rng.random(n).astype(np.float32),
        stability_score=rng.random(n).astype(np.float32),
        bbox=boxes_xywh(masks[order]),
    )


def brute_winner(masks: np.ndarray) -> np.ndarray:
    n, h, w = masks.shape
    out = np.full((h, w), -1, np.int16)
    for y in range(h):
        for x in range(w):
            for i in range(n):  # painted largest first: the last covering mask wins
                if masks[i, y, x]:
                    out[y, x] = i
    return out


def write_store(path: Path, sets: dict[str, MaskSet], size: int) -> None:
    with MaskStoreWriter(path, make_attrs(size), list(sets)) as writer:
        for image_id, ms in sets.items():
            writer.write(image_id, ms, source_sha256=f"sha-{image_id}")


def assert_same(a: MaskSet, b: MaskSet) -> None:
    for field in ("masks", "area", "predicted_iou", "stability_score", "bbox"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.shape == y.shape and x.dtype == y.dtype, field
        np.testing.assert_array_equal(x, y, err_msg=field)


@pytest.mark.parametrize("size", [8, 13, 24])
def test_pack_unpack_round_trip(size: int) -> None:
    masks = np.random.default_rng(size).random((5, size, size)) < 0.3
    packed = pack_masks(masks)
    assert packed.shape == (5, math.ceil(size * size / 8)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_masks(packed, size, size), masks)
    np.testing.assert_array_equal(packed[2], np.packbits(masks[2].ravel()))


def test_boxes_xywh_match_pixel_extent() -> None:
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    boxes = boxes_xywh(masks)
    assert boxes.dtype == np.int32
    assert boxes.tolist() == [[3, 2, 6, 3], [11, 7, 1, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("n", [0, 1, 9])
def test_winner_matches_brute_force(n: int) -> None:
    ms = random_mask_set(np.random.default_rng(n), n, 11)
    winner = compute_winner(ms.masks)
    assert winner.dtype == np.int16 and winner.shape == (11, 11)
    np.testing.assert_array_equal(winner, brute_winner(ms.masks))


@pytest.mark.parametrize("size,counts", [(13, [5, 0, 1]), (16, [12, 3])])
def test_round_trip(tmp_path: Path, size: int, counts: list[int]) -> None:
    rng = np.random.default_rng(size)
    sets = {f"img{i}": random_mask_set(rng, n, size) for i, n in enumerate(counts)}
    path = tmp_path / "masks.h5"
    write_store(path, sets, size)
    assert path.is_file() and not partial_path(path).exists()
    store = MaskStore(path)
    assert store.ids() == sorted(sets)
    assert store.image_shape == (size, size)
    assert store.attrs["format_version"] == 1 and store.attrs["pps"] == 4
    for image_id, ms in sets.items():
        got = store.read(image_id)
        assert_same(got, ms)
        assert got.masks.shape == (len(ms), size, size)
        assert store.read_packed(image_id).shape == (len(ms), math.ceil(size * size / 8))
        winner = store.read_winner(image_id)
        assert winner.dtype == np.int16
        np.testing.assert_array_equal(winner, brute_winner(ms.masks))
        assert store.num_masks(image_id) == len(ms)
    store.close()


def test_empty_image_has_empty_datasets(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    write_store(path, {"a": MaskSet.empty(9, 9)}, 9)
    with h5py.File(path, "r") as f:
        assert f["images/a/masks"].shape == (0, math.ceil(81 / 8))
        assert f["images/a/bbox"].shape == (0, 4)
    store = MaskStore(path)
    assert store.read("a").masks.shape == (0, 9, 9)
    assert (store.read_winner("a") == -1).all()


def test_store_is_much_smaller_than_raw_packed(tmp_path: Path) -> None:
    # a partition of a 128x128 image into 16x16 tiles with jagged borders, like superpixels
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    jitter = rng.integers(-2, 3, (128, 128))
    labels = ((yy + jitter) // 8).clip(0, 15) * 16 + ((xx - jitter) // 8).clip(0, 15)
    masks = labels[None] == np.arange(256)[:, None, None]
    area = masks.reshape(256, -1).sum(1)
    order = np.argsort(-area, kind="stable")
    ms = MaskSet(
        masks[order],
        area[order].astype(np.int32),
        np.ones(256, np.float32),
        np.ones(256, np.float32),
        boxes_xywh(masks[order]),
    )
    path = tmp_path / "m.h5"
    write_store(path, {f"i{k}": ms for k in range(4)}, 128)
    raw = 4 * pack_masks(ms.masks).nbytes
    assert os.path.getsize(path) * 10 <= raw


class _StoreDataset(Dataset):
    def __init__(self, store: MaskStore, ids: list[str]) -> None:
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        ms = self.store.read(self.ids[i])
        return torch.from_numpy(ms.masks.sum(0)), torch.from_numpy(ms.area), os.getpid()


def test_lazy_reader_in_dataloader_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    sets = {f"im{i}": random_mask_set(rng, 4, 12) for i in range(6)}
    path = tmp_path / "m.h5"
    write_store(path, sets, 12)
    store = MaskStore(path)
    assert store.ids()  # opened in the parent before the workers start
    ids = sorted(sets)
    loader = DataLoader(_StoreDataset(store, ids), batch_size=None, num_workers=2)
    pids = set()
    for image_id, (coverage, area, pid) in zip(ids, loader, strict=True):
        np.testing.assert_array_equal(coverage.numpy(), sets[image_id].masks.sum(0))
        np.testing.assert_array_equal(area.numpy(), sets[image_id].area)
        pids.add(pid)
    assert os.getpid() not in pids and len(pids) == 2


def test_pickled_reader_drops_the_handle(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(1), 3, 10)
    path = tmp_path / "m.h5"
    write_store(path, {"x": ms}, 10)
    store = MaskStore(path)
    store.read("x")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None  # noqa: SLF001 - the point of the test
    assert_same(clone.read("x"), ms)


def test_resume_after_close_without_finish(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    sets = {f"i{k}": random_mask_set(rng, 3, 10) for k in range(5)}
    path = tmp_path / "m.h5"
    writer = MaskStoreWriter(path, make_attrs(10), list(sets))
    for image_id in ["i0", "i1", "i2"]:
        writer.write(image_id, sets[image_id], "d-" + image_id)
    writer.close()
    assert not path.exists() and partial_path(path).is_file()
    with MaskStoreWriter(path, make_attrs(10), list(sets)) as writer:
        assert writer.done_ids() == {"i0": "d-i0", "i1": "d-i1", "i2": "d-i2"}
        for image_id in ["i3", "i4"]:
            writer.write(image_id, sets[image_id])
    assert not partial_path(path).exists()
    store = MaskStore(path)
    assert store.ids() == sorted(sets)
    for image_id, ms in sets.items():
        assert_same(store.read(image_id), ms)


def test_half_written_group_is_dropped_on_resume(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(6), 2, 8)
    path = tmp_path / "m.h5"
    writer = MaskStoreWriter(path, make_attrs(8), ["a", "b"])
    writer.write("a", ms)
    writer.close()
    with h5py.File(partial_path(path), "r+") as f:  # what a kill mid-write leaves
        f.create_group("images/b").create_dataset("masks", data=np.zeros((2, 8), np.uint8))
    writer = MaskStoreWriter(path, make_attrs(8), ["a", "b"])
    assert set(writer.done_ids()) == {"a"}
    writer.write("b", ms)
    writer.finish()
    assert_same(MaskStore(path).read("b"), ms)


def test_other_attrs_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ms = random_mask_set(np.random.default_rng(7), 2, 8)
    path = tmp_path / "m.h5"
    writer = MaskStoreWriter(path, make_attrs(8, pps=4), ["a", "b"])
    writer.write("a", ms)
    writer.close()
    with caplog.at_level(logging.WARNING):
        writer = MaskStoreWriter(path, make_attrs(8, pps=8), ["a", "b"])
    assert writer.done_ids() == {}
    assert "other attrs (pps)" in caplog.text
    writer.close()


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_partial_restarts(tmp_path: Path, damage: str) -> None:
    ms = random_mask_set(np.random.default_rng(8), 4, 16)
    path = tmp_path / "m.h5"
    writer = MaskStoreWriter(path, make_attrs(16), ["a", "b"])
    writer.write("a", ms)
    writer.close()
    part = partial_path(path)
    data = part.read_bytes()
    part.write_bytes(b"not hdf5 at all" * 10 if damage == "garbage" else data[: len(data) // 3])
    with MaskStoreWriter(path, make_attrs(16), ["a", "b"]) as writer:
        assert writer.done_ids() == {}
        writer.write("a", ms)
        writer.write("b", ms)
    assert MaskStore(path).ids() == ["a", "b"]


def test_finish_refuses_missing_ids_and_drops_extra(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(9), 2, 8)
    path = tmp_path / "m.h5"
    writer = MaskStoreWriter(path, make_attrs(8), ["a", "b"])
    writer.write("a", ms)
    with pytest.raises(RuntimeError, match="1 image"):
        writer.finish()
    assert not path.exists() and partial_path(path).exists()
    writer = MaskStoreWriter(path, make_attrs(8), ["b"])  # another id list, same attrs
    writer.write("b", ms)
    writer.finish()
    assert MaskStore(path).ids() == ["b"]


def test_exception_inside_with_keeps_partial(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(10), 2, 8)
    path = tmp_path / "m.h5"
    with pytest.raises(KeyError):
        with MaskStoreWriter(path, make_attrs(8), ["a", "b"]) as writer:
            writer.write("a", ms)
            raise KeyError("boom")
    assert not path.exists()
    assert set(MaskStoreWriter(path, make_attrs(8), ["a", "b"]).done_ids()) == {"a"}


def test_encoded_writes_equal_mask_set_writes(tmp_path: Path) -> None:
    """What worker threads hand the writer (encode_masks) stores what a MaskSet stores."""
    rng = np.random.default_rng(5)
    sets = {f"i{n}": random_mask_set(rng, n, 12) for n in (0, 1, 7)}
    write_store(tmp_path / "a.h5", sets, 12)
    with MaskStoreWriter(tmp_path / "b.h5", make_attrs(12), list(sets)) as writer:
        for image_id, ms in sets.items():
            writer.write(image_id, encode_masks(ms, (12, 12)), source_sha256=f"sha-{image_id}")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        for image_id in sets:
            for name, ds in a["images"][image_id].items():
                got = b["images"][image_id][name]
                assert got.dtype == ds.dtype and got.compression == ds.compression, name
                np.testing.assert_array_equal(got[()], ds[()], err_msg=name)


def test_write_rejects_bad_mask_sets(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(11), 3, 8)
    writer = MaskStoreWriter(tmp_path / "m.h5", make_attrs(8))
    unsorted = MaskSet(
        ms.masks[::-1],
        ms.area[::-1] + np.array([0, 0, 1], np.int32),
        ms.predicted_iou,
        ms.stability_score,
        ms.bbox,
    )
    with pytest.raises(ValueError, match="sorted"):
        writer.write("a", unsorted)
    with pytest.raises(ValueError, match="store holds"):
        writer.write("a", random_mask_set(np.random.default_rng(0), 2, 9))
    with pytest.raises(ValueError, match="field of shape"):
        writer.write(
            "a", MaskSet(ms.masks, ms.area[:2], ms.predicted_iou, ms.stability_score, ms.bbox)
        )
    with pytest.raises(ValueError, match="bad image id"):
        writer.write("a/b", ms)
    other = random_mask_set(np.random.default_rng(0), 2, 9)
    with pytest.raises(ValueError, match=r"masks are \(9, 9\), the store holds \(8, 8\)"):
        writer.write("a", encode_masks(other, (9, 9)))  # encoded for another store
    with pytest.raises(ValueError, match="attrs need"):
        MaskStoreWriter(tmp_path / "n.h5", {"generator": "x"})
    writer.close()


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5"
    with pytest.raises(InputError, match=f"^{missing}: mask store not found"):
        MaskStore(missing).ids()
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match=f"^{garbage}: not a readable HDF5") as info:
        MaskStore(garbage).ids()
    assert "\n" not in str(info.value)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_group("images")
    with pytest.raises(InputError, match="no attribute 'generator'"):
        MaskStore(plain).read("x")
    good = tmp_path / "good.h5"
    write_store(good, {"a": MaskSet.empty(8, 8)}, 8)
    with pytest.raises(InputError, match=f"^{good}: no masks for image 'b'"):
        MaskStore(good).read("b")


def test_validate_store(tmp_path: Path) -> None:
    ms = random_mask_set(np.random.default_rng(12), 2, 8)
    path = tmp_path / "m.h5"
    write_store(path, {"a": ms, "b": ms}, 8)
    digests = {"a": "sha-a", "b": "sha-b"}
    assert validate_store(path, make_attrs(8), ["a", "b"], digests)
    assert validate_store(path, make_attrs(8), ["b", "a"])
    assert not validate_store(path, make_attrs(8, pps=5), ["a", "b"])
    assert not validate_store(path, make_attrs(8, extra="x"), ["a", "b"])
    assert not validate_store(path, make_attrs(8), ["a"])
    assert not validate_store(path, make_attrs(8), ["a", "b"], {**digests, "b": "changed"})
    assert not validate_store(tmp_path / "missing.h5", make_attrs(8), ["a"])
    path.write_bytes(b"junk" * 50)
    assert not validate_store(path, make_attrs(8), ["a", "b"])
