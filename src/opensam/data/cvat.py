"""A CVAT Segmentation Mask 1.1 export: its layout, ``labelmap.txt`` parsing, and the writer.

Layout: ``labelmap.txt`` (``name:r,g,b:parts:actions`` lines), ``SegmentationClass/<id>.png``
(RGB colours), ``ImageSets/Segmentation/default.txt`` (ids) and ``JPEGImages/<id>.<ext>``.
:mod:`opensam.data.importers` reads it, so export -> import gives back the same class maps.
"""

from __future__ import annotations

import functools
import io
import logging
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError
from opensam.images import read_image_size
from opensam.runtime import atomic_path

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]
ExportItem = tuple[str, np.ndarray | str | Path, np.ndarray]
SETS_DIR, LABELS_DIR, IMAGES_DIR = "ImageSets/Segmentation/", "SegmentationClass/", "JPEGImages/"
EXPORT_MARKER = ".opensam-export"  # in a directory export: `export-cvat --overwrite` may replace it
EXPORT_ZIP_COMMENT = b"written by opensam export-cvat"  # the same mark for a .zip export


def parse_labelmap(text: str, name: str) -> dict[str, RGB]:
    """Parse CVAT ``labelmap.txt`` text into {label name: (r, g, b)}, in file order.

    Raises InputError naming ``name`` for a missing/bad colour, a duplicate name or colour, or no
    labels at all.
    """
    colours: dict[str, RGB] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        label = fields[0].strip()
        try:
            rgb = tuple(int(v) for v in fields[1].split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except (IndexError, ValueError):
            raise InputError(
                f"{name}: line {number}: expected 'name:r,g,b::' with r, g, b in 0..255"
            ) from None
        if not label or label.lower() in (k.lower() for k in colours):
            raise InputError(f"{name}: line {number}: empty or duplicate label name")
        if rgb in colours.values():
            raise InputError(f"{name}: line {number}: colour {rgb} is used twice")
        colours[label] = (rgb[0], rgb[1], rgb[2])
    if not colours:
        raise InputError(f"{name}: labelmap is empty")
    return colours


def _lines(lines: Iterable[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def _void_colour(used: Iterable[RGB]) -> RGB:
    taken = set(used)
    for v in (0, *range(255, 0, -1)):
        if (v, v, v) not in taken:
            return (v, v, v)
    raise ValueError("no free grey colour for void")  # needs 256 grey classes


def write_cvat_export(
    out: str | Path,
    class_names: Sequence[str],
    colours: Sequence[RGB],
    items: Iterable[ExportItem],
) -> int:
    """Write a CVAT Segmentation Mask 1.1 export to ``out`` (a directory, or a file ``*.zip``).

    ``items`` yields ``(id, image, label)``: image is (H, W, 3) uint8 RGB (saved as JPEG) or a
    photo path (copied as is); label is (H, W) uint8 class ids into ``class_names``, 255 =
    ignore. Ignore pixels get a ``void`` labelmap line, coloured black unless a class uses black
    (then an unused grey). Written atomically; returns the number of items.
    """
    if len(colours) != len(class_names) or len(set(map(tuple, colours))) != len(colours):
        raise ValueError("need one distinct colour per class")
    void = _void_colour((int(c[0]), int(c[1]), int(c[2])) for c in colours)
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colours)] = np.array(colours, np.uint8).reshape(-1, 3)
    palette[IGNORE_INDEX] = void
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".zip":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                ids = _write_items(archive.writestr, items, palette, len(class_names))
                _write_lists(archive.writestr, class_names, colours, void, ids)
                archive.comment = EXPORT_ZIP_COMMENT
        else:
            put = functools.partial(_put_file, tmp)
            ids = _write_items(put, items, palette, len(class_names))
            _write_lists(put, class_names, colours, void, ids)
            put(EXPORT_MARKER, b"written by opensam export-cvat\n")
    log.info("%s: wrote a CVAT export of %d images", out, len(ids))
    return len(ids)


def _put_file(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _write_lists(
    put: Callable[[str, bytes], None],
    class_names: Sequence[str],
    colours: Sequence[RGB],
    void: RGB,
    ids: list[str],
) -> None:
    lines = [f"{n}:{r},{g},{b}::" for n, (r, g, b) in zip(class_names, colours, strict=True)]
    lines.append(f"void:{void[0]},{void[1]},{void[2]}::")
    put("labelmap.txt", b"# label:color_rgb:parts:actions\n" + _lines(lines))
    put(SETS_DIR + "default.txt", _lines(ids))


def _write_items(
    put: Callable[[str, bytes], None],
    items: Iterable[ExportItem],
    palette: np.ndarray,
    n_classes: int,
) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for item_id, image, label in items:
        if item_id in seen or "/" in item_id or item_id.startswith("."):
            raise ValueError(f"bad or duplicate export id '{item_id}'")
        label = np.asarray(label, np.uint8)
        if np.any((label >= n_classes) & (label != IGNORE_INDEX)):
            raise ValueError(f"{item_id}: label has values outside 0..{n_classes - 1} and 255")
        if isinstance(image, np.ndarray):
            if image.shape[:2] != label.shape:
                raise ValueError(f"{item_id}: image {image.shape[:2]} != label {label.shape}")
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buf, "JPEG", quality=95)
            put(f"{IMAGES_DIR}{item_id}.jpg", buf.getvalue())
        else:
            if read_image_size(image) != label.shape:  # the label is in the oriented frame
                raise ValueError(f"{item_id}: photo {image} size != label {label.shape}")
            put(f"{IMAGES_DIR}{item_id}{Path(image).suffix.lower()}", Path(image).read_bytes())
        buf = io.BytesIO()
        Image.fromarray(palette[label]).save(buf, "PNG")
        put(f"{LABELS_DIR}{item_id}.png", buf.getvalue())
        ids.append(item_id)
        seen.add(item_id)
    return ids
