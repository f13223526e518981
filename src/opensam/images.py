"""Robust photo and label-PNG loading, and the two resizes used by ``prepare``.

Every loader takes an :data:`ImageSource` (a path, or an open binary file such as a zip member
read into memory) plus the ``name`` to put in error messages. Decoding is forced (``img.load()``),
so a corrupt or truncated file fails here with ``InputError("<name>: cannot read image (...)")``
rather than later in a worker.

Photos (:func:`load_rgb`) are brought to RGB uint8:

- EXIF orientation is applied (``ImageOps.exif_transpose``): labels drawn in CVAT are in the
  oriented frame, as CVAT shows the photo.
- Grayscale (``1``, ``L``), palette (``P``), CMYK, YCbCr and LAB convert through Pillow.
- Transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent index) is composited on a
  white background, so transparent areas look like the paper the photos are taken on.
- 16-bit grayscale (``I;16*``) is scaled to 8 bit by ``round(v / 257)`` (65535 -> 255), not
  clipped. Mode ``I`` (32-bit int) is taken as 16-bit unless all values are <= 255, then as 8-bit.
  Float (``F``) is taken as [0, 1] when its maximum is <= 1, else as [0, 255]. 16-bit RGB PNGs are
  already reduced to their high byte by Pillow.

Label PNGs are read without EXIF handling or compositing (an alpha channel is dropped).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from opensam.errors import InputError

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike[str] | IO[bytes]
Size = int | tuple[int, int]  # an int is a square side; a tuple is (height, width)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # orientations that swap width and height
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@functools.lru_cache(maxsize=8)
def open_zip(path: Path, pid: int) -> zipfile.ZipFile:
    """One open ZipFile per (archive, process id): a forked worker must not share the parent's."""
    return zipfile.ZipFile(path)


@dataclass(frozen=True)
class FileRef:
    """A file on disk, or a ``member`` of the zip archive at ``path`` (read, never extracted).

    ``str()`` gives the path, or ``zip:<archive>!<member>``. Picklable, so it can go to workers.
    """

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"zip:{self.path}!{self.member}"

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        return open_zip(self.path, os.getpid()).read(self.member)

    def source(self) -> ImageSource:
        """What the loaders here accept: the path, or the member's bytes in memory."""
        return self.path if self.member is None else io.BytesIO(self.read_bytes())


def is_image_name(name: str) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _label(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, str | os.PathLike):
        return os.fspath(src)
    return str(getattr(src, "name", "<image>"))


def _cannot_read(name: str, exc: BaseException) -> InputError:
    detail = " ".join(str(exc).split()) or exc.__class__.__name__
    return InputError(f"{name}: cannot read image ({detail})")


def _open(src: ImageSource, name: str) -> Image.Image:
    try:
        return Image.open(src)
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except (UnidentifiedImageError, *_READ_ERRORS) as exc:
        raise _cannot_read(name, exc) from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of ``img`` after EXIF orientation, from the header only."""
    width, height = img.size
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return height, width


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale ``I;16*``/``I``/``F`` pixel values -> (H, W) uint8, scaled rather than clipped."""
    values = arr.astype(np.float64)
    if mode == "F":
        peak = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    elif mode == "I" and (values.size == 0 or values.max() <= 255):
        peak = 255.0
    else:
        peak = 65535.0
    return np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), "I" if mode == "I" else mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def load_rgb_and_size(
    src: ImageSource, name: str | None = None, min_size: Size | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Load a photo as RGB and also return its full oriented size.

    ``min_size`` lets JPEG decoding run at a reduced scale (``Image.draft``): the result is then
    the smallest DCT-scaled version (1/2, 1/4, 1/8) that is still at least ``min_size`` in both
    dimensions, a cheap antialiased reduction, for callers that resize it down afterwards.

    Returns ``(rgb, (H, W))``: rgb is (h, w, 3) uint8 (h, w <= H, W with ``min_size``), (H, W) is
    the original size after EXIF orientation, the frame labels are drawn in.
    """
    label = _label(src, name)
    with _open(src, label) as img:
        try:
            size = _oriented_size(img)
            if min_size is not None and img.format == "JPEG":
                height, width = _as_hw(min_size)
                if size != (img.size[1], img.size[0]):  # draft works in the stored frame
                    height, width = width, height
                img.draft("RGB", (width, height))
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # transposing copies: only if needed
                img = ImageOps.exif_transpose(img)
            return to_rgb(img), size
        except _READ_ERRORS as exc:
            raise _cannot_read(label, exc) from None


def load_rgb(src: ImageSource, name: str | None = None, min_size: Size | None = None) -> np.ndarray:
    """Load a photo as (H, W, 3) uint8 RGB with EXIF orientation applied (see the module doc)."""
    return load_rgb_and_size(src, name, min_size)[0]


def read_image_size(src: ImageSource, name: str | None = None) -> tuple[int, int]:
    """(height, width) of a photo after EXIF orientation, reading the header only."""
    label = _label(src, name)
    with _open(src, label) as img:
        return _oriented_size(img)


def _load_raw(src: ImageSource, name: str | None) -> tuple[Image.Image, str]:
    label = _label(src, name)
    img = _open(src, label)
    try:
        img.load()
    except _READ_ERRORS as exc:
        img.close()
        raise _cannot_read(label, exc) from None
    return img, label


def load_label_rgb(src: ImageSource, name: str | None = None) -> np.ndarray:
    """Load a colour label PNG (CVAT ``SegmentationClass``) as (H, W, 3) uint8 RGB.

    No EXIF handling; a palette is expanded to its colours; an alpha channel is dropped.
    """
    img, label = _load_raw(src, name)
    with img:
        if img.mode.startswith("I") or img.mode == "F":
            raise InputError(f"{label}: label PNG has mode {img.mode}; expected RGB or palette")
        return np.asarray(img.convert("RGB"))


def rgb_code(r: int, g: int, b: int) -> int:
    """The uint32 code :func:`load_label_codes` gives the colour (r, g, b)."""
    return r | g << 8 | b << 16 | 0xFF << 24


def load_label_codes(src: ImageSource, name: str | None = None) -> np.ndarray:
    """Load a colour label PNG as (H, W) uint32 colour codes, see :func:`rgb_code`.

    Same rules as :func:`load_label_rgb`, but about 4x faster to match against a colour table:
    Pillow packs RGBX pixels in C and numpy only reinterprets the bytes.
    """
    img, label = _load_raw(src, name)
    with img:
        if img.mode.startswith("I") or img.mode == "F":
            raise InputError(f"{label}: label PNG has mode {img.mode}; expected RGB or palette")
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb.convert("RGBX")).view("<u4")[..., 0]


def load_label_index(src: ImageSource, name: str | None = None) -> np.ndarray | None:
    """Load a palette or grayscale label PNG (Pascal VOC) as (H, W) uint8 raw indices.

    Returns None when the PNG is an RGB(A) colour image; read it with :func:`load_label_rgb`.
    """
    img, label = _load_raw(src, name)
    with img:
        if img.mode in ("P", "L"):
            return np.array(img, dtype=np.uint8)
        if img.mode == "1":
            return np.asarray(img.convert("L"), dtype=np.uint8) // 255
        if img.mode in ("RGB", "RGBA"):
            return None
        raise InputError(f"{label}: label PNG has mode {img.mode}; expected palette, L or RGB")


def _as_hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resize_image(rgb: np.ndarray, size: Size) -> np.ndarray:
    """Antialiased (Lanczos) resize of (H, W, 3) uint8 to ``size`` ((h, w), or an int for square).

    The aspect ratio is not kept (squashed, as in the thesis). Returns (h, w, 3) uint8.
    """
    height, width = _as_hw(size)
    if rgb.shape[:2] == (height, width):
        return rgb
    img = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS))


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) uint8 class map to ``size``. Returns (h, w) uint8."""
    height, width = _as_hw(size)
    if label.shape == (height, width):
        return label
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST))


def save_png(array: np.ndarray, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write (H, W) uint8 as mode ``L`` or (H, W, 3) uint8 as ``RGB`` PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG", **kwargs)


def read_label_png(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A mode-L class-id PNG as (H, W) uint8; ``shape`` (H, W) is checked when given."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise InputError(f"{path}: expected a mode L label image, got mode {img.mode}")
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"{path}: label not found") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    if shape is not None and arr.shape != tuple(shape):
        raise InputError(f"{path}: label size {arr.shape} differs from the image's {tuple(shape)}")
    return arr
