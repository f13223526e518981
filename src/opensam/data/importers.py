"""Import a labelled export (CVAT Segmentation Mask 1.1 or Pascal VOC, directory or .zip) and
an unlabelled folder. ``write_cvat_export`` and ``parse_labelmap`` (from
:mod:`opensam.data.cvat`) are re-exported here.

Layout read (``<root>`` is the directory, the zip's root, or the zip's single top folder)::

    <root>/labelmap.txt                      CVAT: 'name:r,g,b:parts:actions' lines, '#' comments
    <root>/ImageSets/Segmentation/*.txt      ids (default.txt if present, else every .txt)
    <root>/SegmentationClass/<id>.png        CVAT: RGB colours; VOC: palette index = class, 255 void
    <root>/JPEGImages/<id>.<jpg|jpeg|png|bmp|tif|tiff>   any case

Label values map to params class ids by class *name* (case-insensitive, stripped): labelmap
entries that are not params classes become 255 (ignore); a params class missing from the labelmap
is an error. Zip members are read into memory, never extracted; a zip with absolute or ``..``
member paths is refused. Ids containing ``/`` (CVAT subfolders) become ``a__b``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opensam.config import ClassSpec
from opensam.constants import IGNORE_INDEX
from opensam.data.cvat import IMAGES_DIR as _IMAGES
from opensam.data.cvat import LABELS_DIR as _LABELS
from opensam.data.cvat import SETS_DIR as _SETS
from opensam.data.cvat import parse_labelmap
from opensam.data.sources import check_zip_members, list_export_dir
from opensam.errors import InputError
from opensam.images import (
    FileRef,
    is_image_name,
    load_label_codes,
    load_label_index,
    load_rgb_and_size,
    open_zip,
    rgb_code,
)

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]
FORMATS = ("cvat", "voc")
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass(frozen=True)
class LabelledItem:
    """One labelled photo: ``id`` (file stem), its image and its label PNG."""

    id: str
    image: FileRef
    label: FileRef


@dataclass(frozen=True)
class UnlabelledItem:
    """One unlabelled photo and its optional hidden ground-truth colour PNG."""

    id: str
    image: FileRef
    gt: FileRef | None = None


def _safe_id(stem: str) -> str:
    return stem.replace("/", "__")


class _Tree:
    """The file names of an export (directory or zip), relative to its detected root."""

    def __init__(self, source: Path) -> None:
        if not source.exists():
            raise InputError(f"{source}: dataset source not found")
        self.source, self.is_zip = source, source.is_file()
        if self.is_zip:
            try:
                infos = open_zip(source, os.getpid()).infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{source}: cannot read zip ({exc})") from None
            check_zip_members(source, infos)
            names = [i.filename for i in infos if not i.filename.endswith("/")]
        else:
            names = list_export_dir(source)
        visible = [
            n for n in names if not any(p.startswith((".", "__MACOSX")) for p in n.split("/"))
        ]
        self.prefix = self._find_prefix(visible)
        self.names = sorted(n[len(self.prefix) :] for n in visible if n.startswith(self.prefix))
        self.set = set(self.names)

    @staticmethod
    def _find_prefix(names: list[str]) -> str:
        prefix = ""
        while True:
            rel = [n[len(prefix) :] for n in names if n.startswith(prefix)]
            if any(n in ("labelmap.txt", "classes.txt") or n.startswith(_LABELS) for n in rel):
                return prefix
            tops = {n.split("/", 1)[0] for n in rel if "/" in n}
            if len(tops) != 1 or any("/" not in n for n in rel):
                return prefix
            prefix += tops.pop() + "/"

    def ref(self, rel: str) -> FileRef:
        if self.is_zip:
            return FileRef(self.source, self.prefix + rel)
        return FileRef(self.source / self.prefix / rel)

    def text(self, rel: str) -> str:
        ref = self.ref(rel)
        try:
            return ref.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"{ref}: not UTF-8 text") from None

    def under(self, folder: str) -> list[str]:
        return [n for n in self.names if n.startswith(folder)]


def voc_colormap(n: int = 256) -> list[RGB]:
    """The standard Pascal VOC palette: the colour of index ``i`` for i < n."""

    def channel(i: int, shift: int) -> int:  # bit 3k+shift of i goes to bit 7-k of the channel
        return sum(((i >> (3 * k + shift)) & 1) << (7 - k) for k in range(8))

    return [(channel(i, 0), channel(i, 1), channel(i, 2)) for i in range(n)]


@dataclass
class Export:
    """An opened labelled export: items, class colours, and label decoding to class ids.

    ``colours`` maps each params class name (params order) to its labelmap colour. Decoding
    yields (H, W) uint8 class ids in params order, 255 = ignore.
    """

    source: str
    format: str
    class_names: list[str]
    colours: dict[str, RGB]
    items: list[LabelledItem]
    labelmap_name: str
    unknown_colour_max_pixels: int = 500
    _codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32), repr=False)
    _code_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False)
    _index_lut: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16), repr=False)

    def read_image(
        self, image: FileRef, min_size: int | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """(h, w, 3) uint8 RGB photo and its full oriented (H, W); see ``load_rgb_and_size``."""
        return load_rgb_and_size(image.source(), str(image), min_size)

    def read_label(
        self, item: LabelledItem, expect_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The item's (H, W) uint8 class ids (255 = ignore); see :meth:`decode_label_file`."""
        return self.decode_label_file(item.label, expect_size)[0]

    def decode_label_file(
        self, ref: FileRef, expect_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, int]:
        """Decode a label PNG to ((H, W) uint8 class ids, number of unknown pixels mapped to 255).

        Raises InputError when its size differs from ``expect_size`` (the photo's oriented
        (H, W)) or when more than ``unknown_colour_max_pixels`` pixels have a colour (VOC: an
        index) that is not in the labelmap.
        """
        index = load_label_index(ref.source(), str(ref)) if self.format == "voc" else None
        if index is not None:
            lut = self._index_lut[index]
            ids = np.where(lut < 0, IGNORE_INDEX, lut).astype(np.uint8)
            n_unknown = int(np.count_nonzero(lut < 0))
            raw, known, what = index, np.flatnonzero(self._index_lut >= 0), "index {3}"
        else:
            raw = load_label_codes(ref.source(), str(ref))
            ids, n_unknown = self._map_codes(raw)
            known, what = self._codes, "colour ({2},{1},{0})"
        if expect_size is not None and ids.shape != tuple(expect_size):
            raise InputError(
                f"{ref}: label is {ids.shape[1]}x{ids.shape[0]} but its image is "
                f"{expect_size[1]}x{expect_size[0]} (width x height)"
            )
        if n_unknown > self.unknown_colour_max_pixels:
            values = raw[np.isin(raw, known, invert=True)].astype(np.int64)
            self._raise_unknown(ref, values, what)
        return ids, n_unknown

    def _map_codes(self, codes: np.ndarray) -> tuple[np.ndarray, int]:
        """(H, W) uint32 colour codes -> ((H, W) uint8 class ids, unknown pixel count)."""
        ids = np.full(codes.shape, IGNORE_INDEX, np.uint8)
        n_known = 0
        for key, class_id in zip(self._codes, self._code_ids, strict=True):
            hit = codes == key  # a few colours: k compares are 3x faster than a searchsorted
            ids[hit] = class_id
            n_known += int(np.count_nonzero(hit))
        return ids, codes.size - n_known

    def _raise_unknown(self, ref: FileRef, values: np.ndarray, what: str) -> None:
        uniq, counts = np.unique(values, return_counts=True)
        top = int(uniq[np.argmax(counts)])
        desc = what.format((top >> 16) & 255, (top >> 8) & 255, top & 255, top)
        msg = f"{ref}: {desc} is not in {self.labelmap_name} ({_pixels(int(counts.max()))}"
        if len(uniq) > 1:
            msg += f"; {len(uniq) - 1} more unknown values, {_pixels(values.size)} in all"
        raise InputError(msg + ")")


def _pixels(n: int) -> str:
    return f"{n:,} pixels".replace(",", " ")


def warn_unknown_colours(files: Sequence[str], max_pixels: int) -> None:
    """Log ONE warning listing the label files whose few unknown-colour pixels became 255."""
    if files:
        log.warning(
            "%d label file(s) had <= %d pixels of colours not in the labelmap, mapped to 255: %s",
            len(files),
            max_pixels,
            ", ".join(files),
        )


def _norm(name: str) -> str:
    return name.strip().lower()


def _class_tables(
    names: list[str], colours: list[RGB], classes: Sequence[ClassSpec], where: str, void: bool
) -> tuple[dict[str, RGB], np.ndarray, np.ndarray, np.ndarray]:
    """Match labelmap entries (names, colours: entry i = VOC index i) to params classes by name.

    Returns the params classes' colours, the colour codes with their class ids (``void``:
    plus the VOC void colour -> 255) and the (256,) int16 index -> class id table (-1 unknown).
    """
    wanted = {_norm(c.name): i for i, c in enumerate(classes)}
    have = {_norm(n): i for i, n in enumerate(names)}
    for c in classes:
        if _norm(c.name) not in have:
            raise InputError(
                f"{where}: class '{c.name}' from params is not in the labelmap "
                f"(it has: {', '.join(names)})"
            )
    ignored = [n for n in names if _norm(n) not in wanted]
    if ignored:
        log.info("%s: label(s) %s are not params classes; their pixels become 255", where, ignored)
    ids = [wanted.get(_norm(n), IGNORE_INDEX) for n in names]
    if void and (void_rgb := voc_colormap(256)[IGNORE_INDEX]) not in colours:
        colours, ids = [*colours, void_rgb], [*ids, IGNORE_INDEX]
    index_lut = np.full(256, -1, np.int16)
    index_lut[: len(names)] = ids[: min(len(names), 256)]
    index_lut[IGNORE_INDEX] = IGNORE_INDEX
    picked = {c.name: colours[have[_norm(c.name)]] for c in classes}
    codes = np.array([rgb_code(*c) for c in colours], np.uint32)
    return picked, codes, np.array(ids, np.uint8), index_lut


def _list_entry(line: str, known: set[str]) -> str:
    """The id on an ImageSets line: the whole line (ids may hold spaces, 'my photo'), or its
    first word when only that is a known id (VOC-style 'id 1' lines)."""
    stem = line.strip()
    first = stem.split(" ")[0]
    return first if stem not in known and first in known else stem


def _read_ids(tree: _Tree, known: set[str]) -> list[str] | None:
    files = [n for n in tree.under(_SETS) if n.endswith(".txt")]
    if not files:
        return None
    if _SETS + "default.txt" in files:
        files = [_SETS + "default.txt"]
    ids: set[str] = set()
    for rel in files:
        seen: set[str] = set()
        for line in tree.text(rel).splitlines():
            if (stem := _list_entry(line, known)) and not stem.startswith("#"):
                if stem in seen:
                    raise InputError(f"{tree.ref(rel)}: id '{stem}' is listed twice")
                seen.add(stem)
        ids |= seen
    return sorted(ids)


def _stems(tree: _Tree, folder: str, images: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel in tree.under(folder):
        if images and not is_image_name(rel) or not images and not rel.lower().endswith(".png"):
            continue
        stem = rel[len(folder) : rel.rfind(".")]
        if stem in out:
            raise InputError(f"{tree.ref(rel)}: duplicate id '{stem}' (also {tree.ref(out[stem])})")
        out[stem] = rel
    return out


def _collect_items(tree: _Tree) -> list[LabelledItem]:
    images, labels = _stems(tree, _IMAGES, True), _stems(tree, _LABELS, False)
    for stem, rel in labels.items():
        if stem not in images:
            raise InputError(f"{tree.ref(rel)}: label without an image in {tree.ref(_IMAGES)}")
    listed = _read_ids(tree, set(labels))
    ids = sorted(labels) if listed is None else listed
    items, seen = [], set()
    for stem in ids:
        if stem not in labels:
            where = tree.ref(_IMAGES + stem) if stem in images else tree.ref(_SETS)
            raise InputError(f"{where}: image '{stem}' is listed without a label in {_LABELS}")
        if (sid := _safe_id(stem)) in seen:
            raise InputError(f"{tree.ref(labels[stem])}: duplicate id '{sid}'")
        seen.add(sid)
        items.append(LabelledItem(sid, tree.ref(images[stem]), tree.ref(labels[stem])))
    if len(ids) < len(labels):
        log.info("%s: %d unlisted labels skipped", tree.source, len(labels) - len(ids))
    return items


def _voc_names(tree: _Tree) -> tuple[list[str], list[RGB], str]:
    if "labelmap.txt" in tree.set:
        lm = parse_labelmap(tree.text("labelmap.txt"), str(tree.ref("labelmap.txt")))
        return list(lm), list(lm.values()), str(tree.ref("labelmap.txt"))
    if "classes.txt" in tree.set:
        names = [n.strip() for n in tree.text("classes.txt").splitlines() if n.strip()]
        if not names:
            raise InputError(f"{tree.ref('classes.txt')}: class list is empty")
        return names, voc_colormap(len(names)), str(tree.ref("classes.txt"))
    return list(VOC_CLASSES), voc_colormap(len(VOC_CLASSES)), "the VOC class list"


def open_export(
    source: str | Path, fmt: str, classes: Sequence[ClassSpec], unknown_colour_max_pixels: int = 500
) -> Export:
    """Open a CVAT Segmentation Mask 1.1 (``fmt="cvat"``) or Pascal VOC (``"voc"``) export.

    ``source`` is a directory or a .zip. Checks the labelmap, the classes and that every listed
    id has exactly one image and one label; per-image checks happen when labels are decoded.
    """
    if fmt not in FORMATS:
        raise InputError(f"{source}: unknown dataset format '{fmt}' (expected cvat or voc)")
    tree = _Tree(Path(source))
    if fmt == "cvat":
        if "labelmap.txt" not in tree.set:
            raise InputError(f"{tree.ref('labelmap.txt')}: labelmap not found")
        where = str(tree.ref("labelmap.txt"))
        labelmap = parse_labelmap(tree.text("labelmap.txt"), where)
        names, colours = list(labelmap), list(labelmap.values())
    else:
        names, colours, where = _voc_names(tree)
    void = fmt == "voc" and not where.endswith("labelmap.txt")
    picked, codes, code_ids, index_lut = _class_tables(names, colours, classes, where, void)
    items = _collect_items(tree)
    log.info("%s: %d labelled images (%s)", source, len(items), fmt)
    return Export(
        str(source),
        fmt,
        [c.name for c in classes],
        picked,
        items,
        Path(where).name,
        unknown_colour_max_pixels,
        codes,
        code_ids,
        index_lut,
    )


def list_unlabelled(
    folder: str | Path, gt_folder: str | Path | None = None, taken_ids: Iterable[str] = ()
) -> list[UnlabelledItem]:
    """All image files directly in ``folder``, sorted by name, each with ``<gt_folder>/<id>.png``.

    Raises InputError when the folder is missing, two files share a stem, or a stem equals one of
    ``taken_ids`` (the labelled ids). A missing ``gt_folder`` is simply not used.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: unlabelled image folder not found")
    gt_dir = Path(gt_folder) if gt_folder is not None and Path(gt_folder).is_dir() else None
    taken, items, by_id = set(taken_ids), [], dict[str, Path]()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not is_image_name(path.name):
            continue
        if path.stem in by_id:
            raise InputError(f"{path}: duplicate id '{path.stem}' (also {by_id[path.stem]})")
        if path.stem in taken:
            raise InputError(f"{path}: unlabelled id '{path.stem}' is also a labelled image id")
        by_id[path.stem] = path
        gt = gt_dir / f"{path.stem}.png" if gt_dir is not None else None
        items.append(
            UnlabelledItem(path.stem, FileRef(path), FileRef(gt) if gt and gt.is_file() else None)
        )
    missing = sum(1 for it in items if it.gt is None)
    if gt_dir is not None and missing:
        log.warning(
            "%s: %d of %d unlabelled images have no ground truth", gt_dir, missing, len(items)
        )
    return items
