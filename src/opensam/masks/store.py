"""The HDF5 mask store: the one owner of writing and reading precomputed region masks.

Format (``format_version`` = :data:`opensam.constants.MASK_STORE_FORMAT_VERSION`)::

    /                     attrs: generator (str), model (str), checkpoint_sha256 (str), pps (int),
                                 min_region_area (int), image_size (int), format_version (int),
                                 plus any str/int/float/bool attrs the caller adds
    /images/<image_id>/   attrs: complete (1, written last), source_sha256 (str, may be "")
        masks             uint8 (n, ceil(H*W/8)): row i = np.packbits(mask_i.ravel()), row-major,
                          big bit order; gzip, chunks of whole rows up to 4 MiB (n = 0: shape
                          (0, ceil(H*W/8)), not chunked)
        area              int32 (n,)        pixels per mask
        predicted_iou     float32 (n,)
        stability_score   float32 (n,)
        bbox              int32 (n, 4)      x, y, w, h; w, h = pixels spanned (all 0 if empty)
        winner            int16 (H, W)      index of the mask painting each pixel, -1 = none

Masks are sorted by area, largest first (the aggregation order). Painted in that order a smaller
mask overwrites a larger one, so ``winner`` is the largest index covering a pixel.

Atomicity and resume: :class:`MaskStoreWriter` writes ``.<name>.partial`` beside the final path,
sets an image's ``complete`` attr after all its datasets and flushes. A SIGKILL at any moment
leaves at worst one incomplete group, which the next writer with the same attrs drops and
rewrites. Only :meth:`MaskStoreWriter.finish` moves the partial to the final name
(``os.replace``), after checking every expected image, so the final path never holds an
incomplete store. Flushes reach the OS, not the disk (no fsync): a killed process is safe; after
a power cut the partial may be corrupt, which is detected and rebuilt.

Readers (:class:`MaskStore`) open the file lazily, once per process (DataLoader workers reopen).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from opensam.constants import MASK_STORE_FORMAT_VERSION
from opensam.errors import InputError
from opensam.masks.arrays import EncodedMasks, MaskSet, encode_masks, unpack_masks

log = logging.getLogger(__name__)

REQUIRED_ATTRS: tuple[str, ...] = ("generator", "model", "checkpoint_sha256", "pps")
REQUIRED_ATTRS += ("min_region_area", "image_size", "format_version")
MASKS_COMPRESSION = "gzip"  # lzf: 2.5x the bytes for no faster reads (bench/mask_store.py)
MASKS_COMPRESSION_LEVEL = 4  # level 9: 14 % fewer bytes for 4x the write time
MASKS_CHUNK_BYTES = 4 << 20  # whole stack in one chunk up to 4 MiB (512 masks at 256x256)
_DATASETS = ("masks", "area", "predicted_iou", "stability_score", "bbox", "winner")
AttrValue = str | int | float | bool


def partial_path(path: str | Path) -> Path:
    """The partial file beside ``path``: ``data/masks.h5`` -> ``data/.masks.h5.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _plain(value: Any) -> Any:
    """h5py attr value -> plain python (numpy scalars, bytes) so attrs compare by value."""
    value = value.item() if isinstance(value, np.generic) else value
    return value.decode() if isinstance(value, bytes) else value


def _read_attrs(obj: h5py.File | h5py.Group) -> dict[str, Any]:
    return {k: _plain(v) for k, v in obj.attrs.items()}


def _attrs_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Comma-separated keys whose values differ ("" if equal)."""
    return ", ".join(sorted(k for k in {*a, *b} if a.get(k) != b.get(k)))


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{exc.__class__.__name__}: {exc}".split())


def _full_attrs(attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    """The caller's attrs plus format_version; checks required keys and value types."""
    full: dict[str, AttrValue] = {"format_version": MASK_STORE_FORMAT_VERSION, **attrs}
    if full["format_version"] != MASK_STORE_FORMAT_VERSION or not set(REQUIRED_ATTRS) <= set(full):
        raise ValueError(
            f"mask store attrs need {REQUIRED_ATTRS}, version {full['format_version']}"
        )
    bad = [k for k, v in full.items() if not isinstance(v, str | int | float | bool)]
    if bad:
        raise TypeError(f"mask store attr {bad[0]!r} must be str/int/float/bool")
    return full


def _write_group(group: h5py.Group, enc: EncodedMasks) -> None:
    """Write one image's datasets into ``group`` (the caller marks it complete afterwards)."""
    packed = enc.masks
    if len(packed):  # few big chunks: deflate sees the long zero runs across masks (2x smaller)
        rows = max(1, min(len(packed), MASKS_CHUNK_BYTES // max(packed.shape[1], 1)))
        opts = {
            "chunks": (rows, packed.shape[1]),
            "compression": MASKS_COMPRESSION,
            "compression_opts": MASKS_COMPRESSION_LEVEL,
        }
        group.create_dataset("masks", data=packed, **opts)
    else:  # a chunked dataset cannot have a zero-length chunk dimension
        group.create_dataset("masks", data=packed)
    group.create_dataset("area", data=enc.area)
    group.create_dataset("predicted_iou", data=enc.predicted_iou)
    group.create_dataset("stability_score", data=enc.stability_score)
    group.create_dataset("bbox", data=enc.bbox)
    winner = enc.winner
    group.create_dataset(
        "winner", data=winner, chunks=winner.shape, compression="gzip", shuffle=True
    )


def _group_ok(group: h5py.Group) -> bool:
    """True when a group is marked complete and its datasets have consistent shapes."""
    if not int(group.attrs.get("complete", 0)) or any(k not in group for k in _DATASETS):
        return False
    n = group["masks"].shape[0]
    h, w = group["winner"].shape
    shapes = [group[k].shape for k in _DATASETS]
    return shapes == [(n, math.ceil(h * w / 8)), (n,), (n,), (n,), (n, 4), (h, w)]


def _scan_images(f: h5py.File) -> tuple[dict[str, str], list[str]]:
    """({complete id: its source_sha256}, [incomplete ids]) of an open store."""
    done, bad = {}, []
    for name, group in f["images"].items():
        if _group_ok(group):
            done[name] = str(_plain(group.attrs.get("source_sha256", "")))
        else:
            bad.append(name)
    return done, bad


class MaskStoreWriter:
    """Resumable writer: ``with MaskStoreWriter(path, attrs, ids) as w: w.write(id, ms)``.

    Writes ``partial_path(path)``. An existing partial with the same attrs is resumed
    (:meth:`done_ids`); one with other attrs, or that h5py cannot read, is deleted (logged) and
    started over. A clean ``with`` exit calls :meth:`finish`; an exception keeps the partial.
    ``attrs`` must hold REQUIRED_ATTRS but format_version, which the writer adds.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, AttrValue],
        expected_ids: Iterable[str] | None = None,
        flush_every: int = 1,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.attrs = _full_attrs(attrs)
        self.expected_ids = None if expected_ids is None else list(expected_ids)
        self.flush_every = max(1, flush_every)
        self._shape = (int(self.attrs["image_size"]),) * 2
        self._done: dict[str, str] = {}
        self._unflushed = 0
        self._file: h5py.File | None = self._open()

    def _open(self) -> h5py.File:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            f, reason = self._try_resume()
            if f is not None:
                return f
            log.warning("%s: %s; starting over", self.partial, reason)
            self.partial.unlink()
            self._done.clear()
        f = h5py.File(self.partial, "w")
        f.attrs.update(self.attrs)
        f.create_group("images")
        f.flush()
        return f

    def _try_resume(self) -> tuple[h5py.File | None, str]:
        """Open the partial for appending, or return (None, why it cannot be resumed)."""
        try:
            f = h5py.File(self.partial, "r+")
        except Exception as exc:  # h5py raises OSError; a damaged file can raise anything
            return None, f"unreadable partial store ({_one_line(exc)})"
        try:
            diff = _attrs_diff(_read_attrs(f), self.attrs)
            if diff:
                f.close()
                return None, f"partial store was made with other attrs ({diff})"
            self._done, bad = _scan_images(f)
            for name in bad:  # groups a killed run left half-written
                log.info("%s: dropping incomplete image %r", self.partial, name)
                del f["images"][name]
            f.flush()
        except Exception as exc:
            f.close()
            return None, f"corrupt partial store ({_one_line(exc)})"
        log.info("%s: resuming, %d image(s) already done", self.partial, len(self._done))
        return f, ""

    def __enter__(self) -> MaskStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None and self._file is not None:
            self.finish()
        else:
            self.close()

    def done_ids(self) -> dict[str, str]:
        """Complete ids (resumed or written here), each mapped to its recorded source_sha256."""
        return dict(self._done)

    def write(self, image_id: str, masks: MaskSet | EncodedMasks, source_sha256: str = "") -> None:
        """Store one image's masks, maybe encoded already (replacing an earlier group of that id),
        then mark it complete."""
        f = self._require_open()
        if not image_id or "/" in image_id or image_id in (".", ".."):
            raise ValueError(f"bad image id {image_id!r}")
        if isinstance(masks, MaskSet):
            masks = encode_masks(masks, self._shape)
        elif (shape := masks.winner.shape) != self._shape:
            raise ValueError(f"masks are {shape}, the store holds {self._shape} images")
        images = f["images"]
        if image_id in images:
            del images[image_id]
            self._done.pop(image_id, None)
        group = images.create_group(image_id)
        _write_group(group, masks)
        group.attrs["source_sha256"] = source_sha256
        group.attrs["complete"] = 1  # last: a group without it is dropped on resume
        self._done[image_id] = source_sha256
        self._unflushed += 1
        if self._unflushed >= self.flush_every:  # to the OS: a killed process keeps them
            f.flush()
            self._unflushed = 0

    def finish(self) -> Path:
        """Check all expected ids are complete, drop others, move the partial to the final path."""
        f = self._require_open()
        if self.expected_ids is not None:
            missing = [i for i in self.expected_ids if i not in self._done]
            if missing:
                self.close()
                raise RuntimeError(f"{self.partial}: {len(missing)} image(s) missing: {missing[0]}")
            for image_id in sorted(set(self._done) - set(self.expected_ids)):
                log.info("%s: dropping image %r, not asked for", self.partial, image_id)
                del f["images"][image_id]
                del self._done[image_id]
        self.close()
        os.replace(self.partial, self.path)
        log.info("%s: wrote %d image(s)", self.path, len(self._done))
        return self.path

    def close(self) -> None:
        """Flush and close the partial without finishing (it stays for a later resume)."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"{self.partial}: writer is closed")
        return self._file


class MaskStore:
    """Lazy reader of a finished store; picklable, reopens the file once per process.

    Any file that is missing, unreadable or not a mask store raises :class:`InputError` naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = None  # a handle inherited through fork belongs to the parent
            self._file = _open_store(self.path)
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes as plain python values."""
        return _read_attrs(self._h5())

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of every image: (image_size, image_size)."""
        size = int(self._h5().attrs["image_size"])
        return size, size

    def ids(self) -> list[str]:
        """Image ids in the store, sorted by name."""
        return sorted(self._h5()["images"])

    def _group(self, image_id: str) -> h5py.Group:
        images = self._h5()["images"]
        if image_id not in images:
            raise InputError(f"{self.path}: no masks for image {image_id!r}")
        group = images[image_id]
        if not int(group.attrs.get("complete", 0)):
            raise InputError(f"{self.path}: image {image_id!r} is incomplete")
        return group

    def num_masks(self, image_id: str) -> int:
        """n for one image, without reading the masks."""
        return int(self._group(image_id)["masks"].shape[0])

    def read_packed(self, image_id: str) -> np.ndarray:
        """(n, ceil(H*W/8)) uint8 bit-packed masks (see :func:`unpack_masks`)."""
        return self._read(self._group(image_id), "masks")

    def read_winner(self, image_id: str) -> np.ndarray:
        """(H, W) int16 index of the mask painting each pixel, -1 where no mask covers it."""
        return self._read(self._group(image_id), "winner")

    def read(self, image_id: str) -> MaskSet:
        """One image's masks as a MaskSet ((n, H, W) bool masks, sorted largest first)."""
        group = self._group(image_id)
        h, w = group["winner"].shape
        return MaskSet(
            masks=unpack_masks(self._read(group, "masks"), h, w),
            area=self._read(group, "area"),
            predicted_iou=self._read(group, "predicted_iou"),
            stability_score=self._read(group, "stability_score"),
            bbox=self._read(group, "bbox"),
        )

    def _read(self, group: h5py.Group, name: str) -> np.ndarray:
        try:
            return np.asarray(group[name][()])
        except Exception as exc:  # a damaged chunk, a missing dataset
            msg = f"{self.path}: cannot read {group.name}/{name} ({_one_line(exc)})"
            raise InputError(msg) from None


def _open_store(path: Path) -> h5py.File:
    """Open a finished store read-only, or raise InputError naming the file."""
    if not path.is_file():
        raise InputError(f"{path}: mask store not found")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable HDF5 mask store ({_one_line(exc)})") from None
    problem = next((f"no attribute {k!r}" for k in REQUIRED_ATTRS if k not in f.attrs), "")
    problem = problem or ("" if "images" in f else "no group /images")
    version = _plain(f.attrs.get("format_version"))
    if not problem and version != MASK_STORE_FORMAT_VERSION:
        problem = f"format {version}, expected {MASK_STORE_FORMAT_VERSION}; rebuild it"
    if problem:
        f.close()
        raise InputError(f"{path}: not a usable mask store ({problem})")
    return f


def validate_store(
    path: str | Path,
    expected_attrs: Mapping[str, AttrValue],
    expected_ids: Collection[str],
    digests: Mapping[str, str] | None = None,
) -> bool:
    """True if ``path`` is a complete store with these attrs, exactly these ids (and digests).

    Never raises for a bad file: a missing, corrupt or stale store returns False (logged why),
    so that the caller rebuilds it.
    """
    if not Path(path).exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            diff = _attrs_diff(_read_attrs(f), _full_attrs(expected_attrs))
            done, bad = _scan_images(f)
    except Exception as exc:
        log.info("%s: cannot reuse: unreadable (%s)", path, _one_line(exc))
        return False
    changed = [i for i in done if digests is not None and digests.get(i) != done[i]]
    if diff:
        reason = f"made with other attrs ({diff})"
    elif bad:
        reason = f"image {bad[0]!r} is incomplete"
    elif set(done) != set(expected_ids):
        reason = f"holds {len(done)} image(s), not the {len(expected_ids)} expected"
    elif changed:
        reason = f"image {changed[0]!r} has changed"
    else:
        return True
    log.info("%s: cannot reuse: %s", path, reason)
    return False


def completed_images(path: Path, attrs: Mapping[str, AttrValue]) -> dict[str, str]:
    """{id: source_sha256} of the complete images of a (partial) store made with ``attrs``;
    {} when it is missing, unreadable or made with other attrs. Opens it read-only."""
    if not path.is_file():
        return {}
    try:
        with h5py.File(path, "r") as f:
            if _attrs_diff(_read_attrs(f), _full_attrs(attrs)):
                return {}
            return _scan_images(f)[0]
    except Exception as exc:  # a damaged partial: the writer rebuilds it later
        log.info("%s: not reused (%s)", path, exc.__class__.__name__)
        return {}


def summarize_store(path: Path) -> dict[str, float]:
    """Masks per image (min, median, max), file bytes per image and the ratio to raw bit-packed
    bytes (sum of n * ceil(H*W/8))."""
    store = MaskStore(path)
    try:
        ids = store.ids()
        counts = np.array([store.num_masks(i) for i in ids], np.int64)
        h, w = store.image_shape
    finally:
        store.close()
    n_images = max(len(ids), 1)
    file_bytes = Path(path).stat().st_size
    raw = int(counts.sum()) * math.ceil(h * w / 8)
    return {
        "images": float(len(ids)),
        "masks_min": float(counts.min()) if counts.size else 0.0,
        "masks_median": float(np.median(counts)) if counts.size else 0.0,
        "masks_max": float(counts.max()) if counts.size else 0.0,
        "bytes_per_image": file_bytes / n_images,
        "raw_bytes_per_image": raw / n_images,
        "compression": raw / file_bytes if file_bytes else 0.0,
    }
