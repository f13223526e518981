"""Safe listing of a labelled export's files (a directory or a zip), for the importers.

A hostile or careless export must not reach outside itself or exhaust memory:
- zip members with absolute or ``..`` paths are refused, and so are members whose decompressed
  size is over :data:`MAX_MEMBER_BYTES` (:data:`MAX_TEXT_BYTES` for ``.txt`` lists and the
  labelmap): members are read into memory, and ``zipfile`` never inflates past a member's size;
- in a directory, a symlink (file or folder) is never followed out of the export, and a
  symlinked folder is refused by name rather than silently skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import zipfile
from pathlib import Path

from opensam.errors import InputError

MAX_MEMBER_BYTES = 1 << 30  # 1 GiB decompressed: far above any photo or label PNG
MAX_TEXT_BYTES = 16 << 20  # labelmap.txt, classes.txt, ImageSets lists


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def check_zip_members(archive: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse unsafe member paths and oversized (decompressed) members of ``archive``."""
    for info in infos:
        name = info.filename
        parts = re.split(r"[/\\]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise InputError(f"{archive}: refusing zip with unsafe member path '{name}'")
        cap = MAX_TEXT_BYTES if name.lower().endswith(".txt") else MAX_MEMBER_BYTES
        if info.file_size > cap:
            raise InputError(
                f"{archive}: member '{name}' is {_mib(info.file_size)} decompressed "
                f"(more than {_mib(cap)}); refusing it"
            )


def list_export_dir(source: Path) -> list[str]:
    """Files of the directory export ``source``, relative, ``/``-separated. A symlink that
    leaves the export, a symlinked folder or a special file (FIFO, device, socket) raises
    :class:`InputError` naming it."""
    root = source.resolve()
    names = []
    for dirpath, dirs, files in os.walk(source):
        for entry in (*dirs, *files):
            path = Path(dirpath, entry)
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not target.is_relative_to(root):
                raise InputError(f"{path}: symlink points outside the export ({source})")
            if target.is_dir():
                raise InputError(f"{path}: symlinked folder (not followed); copy it into place")
        for name in files:
            path = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):  # a dangling symlink: reported later
                if not stat.S_ISREG(path.stat().st_mode):  # never opened: a FIFO would hang
                    raise InputError(f"{path}: not a regular file (a FIFO or device); remove it")
            names.append(path.relative_to(source).as_posix())
    return names
