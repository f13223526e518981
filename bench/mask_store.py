"""Mask store layout: bytes per image and read/write time, ours against the obvious baselines.

    .venv/bin/python bench/mask_store.py [--quick] [--images 16] [--pps 16]

Masks are SLIC superpixels (``opensam.masks.superpixels``, the demo generator) of procedural demo
scenes (``opensam.demo.scene.render_scene``, 1024x683 resized to 256x256). Each layout writes
the same masks to its own HDF5 file, one group per image; "read" is reading one image's masks
back as (n, H, W) bool. Rows:
- baseline: the (n, H, W) bool stack as is, gzip, h5py's automatic chunks;
- bit-packed layouts (uint8 (n, ceil(H*W/8))): contiguous (raw), lzf, gzip 4 with one chunk per
  mask, gzip 9 and gzip 4 (our masks dataset alone) with the whole stack in one chunk;
- ours: ``MaskStoreWriter`` (bit-packed, gzip 4, whole rows in chunks of up to 4 MiB) writing the
  full schema (masks + area, scores, bbox and the winner index); its bytes include all of it.
The last lines give ours against raw bit-packed bytes and ``mask_store speedup: N.NNx`` =
baseline read time / our read time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from opensam.demo.dataset import render_scene
from opensam.masks.arrays import MaskSet, pack_masks, unpack_masks
from opensam.masks.store import AttrValue, MaskStore, MaskStoreWriter
from opensam.masks.superpixels import compute_superpixels

SIZE = 256


def make_mask_sets(count: int, pps: int) -> list[MaskSet]:
    sets = []
    for i in range(count):
        photo, _ = render_scene(np.random.default_rng(i), 1024, 683)
        image = np.asarray(Image.fromarray(photo).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
        sets.append(compute_superpixels(image, pps))
    return sets


def bool_opts(ms: MaskSet) -> tuple[np.ndarray, dict[str, Any]]:
    return ms.masks, {"compression": "gzip", "chunks": True}


def packed(**opts: Any) -> Callable[[MaskSet], tuple[np.ndarray, dict[str, Any]]]:
    def layout(ms: MaskSet) -> tuple[np.ndarray, dict[str, Any]]:
        data = pack_masks(ms.masks)
        chunks = opts.get("chunk_rows")
        kw = {k: v for k, v in opts.items() if k != "chunk_rows"}
        if chunks == "row":
            kw["chunks"] = (1, data.shape[1])
        elif chunks == "all":
            kw["chunks"] = data.shape
        return data, kw

    return layout


def time_layout(
    path: Path, sets: list[MaskSet], layout: Callable[[MaskSet], tuple[np.ndarray, dict[str, Any]]]
) -> tuple[float, float, float]:
    """(bytes per image, write ms per image, read ms per image) of one layout."""
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        for i, ms in enumerate(sets):
            data, kw = layout(ms)
            f.create_group(f"images/{i}").create_dataset("masks", data=data, **kw)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        for i, _ in enumerate(sets):
            data = f[f"images/{i}/masks"][()]
            if data.dtype == np.uint8:
                data = unpack_masks(data, SIZE, SIZE)
    read = time.perf_counter() - t0
    n = len(sets)
    return path.stat().st_size / n, 1000 * write / n, 1000 * read / n


def time_ours(path: Path, sets: list[MaskSet], pps: int) -> tuple[float, float, float]:
    attrs: dict[str, AttrValue] = {
        "generator": "superpixels",
        "model": "slic",
        "pps": pps,
        "checkpoint_sha256": "",
        "min_region_area": 0,
        "image_size": SIZE,
    }
    ids = [str(i) for i in range(len(sets))]
    t0 = time.perf_counter()
    with MaskStoreWriter(path, attrs, ids) as writer:
        for image_id, ms in zip(ids, sets, strict=True):
            writer.write(image_id, ms)
    write = time.perf_counter() - t0
    store = MaskStore(path)
    t0 = time.perf_counter()
    for image_id in ids:
        store.read(image_id)
    read = time.perf_counter() - t0
    store.close()
    n = len(sets)
    return path.stat().st_size / n, 1000 * write / n, 1000 * read / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--pps", type=int, default=16)
    args = parser.parse_args()
    count = 4 if args.quick else args.images
    sets = make_mask_sets(count, args.pps)
    raw = float(np.mean([pack_masks(ms.masks).nbytes for ms in sets]))
    counts = [len(ms) for ms in sets]
    print(
        f"{count} demo images at {SIZE}x{SIZE}, pps {args.pps}: {min(counts)}-{max(counts)} "
        f"masks per image, raw bit-packed {raw:.0f} bytes per image"
    )
    layouts = {
        "baseline: bool, gzip, auto chunks": bool_opts,
        "bit-packed, contiguous (raw)": packed(),
        "bit-packed, lzf, whole stack": packed(compression="lzf", chunk_rows="all"),
        "bit-packed, gzip 4, chunk per mask": packed(
            compression="gzip", compression_opts=4, chunk_rows="row"
        ),
        "bit-packed, gzip 9, whole stack": packed(
            compression="gzip", compression_opts=9, chunk_rows="all"
        ),
        "bit-packed, gzip 4, whole stack (ours)": packed(
            compression="gzip", compression_opts=4, chunk_rows="all"
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, layout) in enumerate(layouts.items()):
            rows.append((name, *time_layout(Path(tmp) / f"{k}.h5", sets, layout)))
        rows.append(
            ("ours: MaskStoreWriter, full schema", *time_ours(Path(tmp) / "o.h5", sets, args.pps))
        )
    print(f"{'layout':40s} {'bytes/img':>10s} {'vs raw':>7s} {'write ms':>9s} {'read ms':>8s}")
    for name, size, write, read in rows:
        print(f"{name:40s} {size:10.0f} {raw / size:6.1f}x {write:9.1f} {read:8.1f}")
    ours, base = rows[-1], rows[0]
    print(f"mask_store size vs raw bit-packed: {raw / ours[1]:.1f}x smaller")
    print(f"mask_store speedup: {base[3] / ours[3]:.2f}x")


if __name__ == "__main__":
    main()
