"""The photos of a predict input: a folder (searched recursively, hidden entries skipped) or a
``.txt`` list of photo paths (relative to the list file, ``#`` starts a comment); their ids; the
files refused without being opened (no image extension, a name that is not UTF-8, a FIFO or
device); and the rule that the output folder stays apart from the input and ``data.source``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from opensam.errors import InputError
from opensam.images import IMAGE_EXTENSIONS, is_image_name

if TYPE_CHECKING:
    from opensam.apps.predict import Photo

log = logging.getLogger(__name__)


@dataclass
class PhotoList:
    """Photos to predict, and files refused without loading them: ``(path, reason)``."""

    photos: list[Photo]
    refused: list[tuple[str, str]] = field(default_factory=list)


def _assign_ids(paths: Sequence[Path], root: Path) -> list[Photo]:
    """Ids: paths relative to ``root`` without extension, ``/`` -> ``__``; a clash (a.jpg and
    a.png) appends the extension (``a_jpg``, ``a_png``). Ids are unique ignoring case (output
    files must not clash on a case-insensitive disk either): what still clashes (a.jpg and
    a.JPG, sub/inner.jpg and sub__inner.jpg) gets ``_2``, ``_3``, ... in path order."""
    from opensam.apps.predict import Photo

    ids = [p.relative_to(root).with_suffix("").as_posix().replace("/", "__") for p in paths]
    clash = {i for i, n in Counter(i.casefold() for i in ids).items() if n > 1}
    ids = [
        f"{i}_{p.suffix[1:].lower()}" if i.casefold() in clash else i
        for i, p in zip(ids, paths, strict=True)
    ]
    taken: set[str] = set()
    unique = []
    for image_id in ids:
        candidate, n = image_id, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{image_id}_{n}"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return [Photo(i, p) for i, p in zip(unique, paths, strict=True)]


def _read_list_file(source: Path) -> list[Path]:
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: cannot read list file ({exc.__class__.__name__})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    paths = [Path(e).expanduser() for e in entries]
    return list(
        dict.fromkeys(Path(os.path.normpath((source.parent / p).absolute())) for p in paths)
    )


def _walk_folder(source: Path) -> Iterator[Path]:
    for path in source.rglob("*"):
        if path.is_file() and not any(s.startswith(".") for s in path.relative_to(source).parts):
            yield path


def list_photos(source: Path) -> PhotoList:
    """The photos of ``source``: a folder (recursive, hidden entries skipped, sorted) or a
    ``.txt`` list of paths. Files without an image extension are refused (reported as failed,
    never loaded). Raises :class:`InputError` when ``source`` is missing or has no image file.
    """
    source = Path(source)
    if source.is_dir():
        files, root = sorted(_walk_folder(source)), source
    elif source.is_file() and source.suffix.lower() == ".txt":
        files = _read_list_file(source)
        root = Path(os.path.commonpath([p.parent for p in files])) if files else source
    elif source.exists():
        raise InputError(f"{source}: expected a folder of photos or a .txt list of photo paths")
    else:
        raise InputError(f"{source}: not found")
    refused = [(printable(p), why) for p in files if (why := _refusal(p)) is not None]
    for path, why in refused:
        if why != NOT_AN_IMAGE:
            log.warning("%s: %s; skipped", path, why)
    images = [p for p in files if _refusal(p) is None]
    if not images:
        raise InputError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return PhotoList(_assign_ids(images, root), refused)


NOT_AN_IMAGE = "not an image file (extension)"


def printable(path: Path) -> str:
    """``path`` as text that can be written anywhere: bytes that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _refusal(path: Path) -> str | None:
    """Why ``path`` is not predicted (never opened for reading), or None."""
    if not is_image_name(path.name):
        return NOT_AN_IMAGE
    if printable(path) != str(path):
        return "file name is not valid UTF-8; rename it"
    if path.exists() and not path.is_file():
        return "not a regular file (a FIFO, device or folder)"
    return None


def check_output_dir(
    source: Path, out_dir: Path, protected: Mapping[str, Path | None] | None = None
) -> None:
    """Refuse an output folder that equals, holds or sits inside the input (or, for a list
    file, any folder of its photos) or a ``protected`` path (``data.source``): predict would
    overwrite them or a rerun would read its own output. Symlinks are resolved."""
    from opensam.apps.guards import check_apart

    source = Path(source)
    inputs: dict[str, Path | None] = {}
    if source.is_file():
        inputs["input list"] = source
        for i, folder in enumerate(sorted({p.parent for p in _read_list_file(source)})):
            inputs[f"folder #{i + 1} of listed photos"] = folder
    else:
        inputs["input folder"] = source
    inputs.update(protected or {})
    check_apart(out_dir, inputs)
