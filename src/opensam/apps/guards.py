"""Guards around the console script's outputs: what ``--out`` may replace, and output locks.

- :func:`check_export_target`: ``opensam export-cvat --out`` never deletes what it did not
  write. An existing output is refused unless ``--overwrite``; even then only a .zip file, or a
  folder holding the :data:`EXPORT_MARKER` that a directory export writes, is replaced.
- :func:`check_apart`: an output never equals, holds or sits inside an input (resolved paths).
- :func:`output_lock`: ``opensam predict`` holds ``<out>/.opensam.lock`` (``flock``) while it
  writes, so a second run into the same folder stops with one line instead of losing CSV rows.
  The kernel releases the lock of a killed run, so it is taken over, by exactly one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from opensam.data.cvat import EXPORT_MARKER, EXPORT_ZIP_COMMENT
from opensam.errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".opensam.lock"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolved(path: Path) -> Path:
    """``path`` with every symlink resolved (also of a path that does not exist yet)."""
    return Path(os.path.realpath(path))


def check_apart(out: Path, inputs: Mapping[str, Path | None]) -> None:
    """Refuse an output that equals, holds or sits inside one of ``inputs`` (``what -> path``;
    None entries are skipped), comparing resolved paths, so a symlink does not hide it: writing
    there could overwrite the user's photos or labelled data, and a rerun would read its own
    output. Raises :class:`InputError` naming ``out``."""
    res = _resolved(out)
    for what, path in inputs.items():
        if path is None:
            continue
        other = _resolved(path)
        if res == other:
            raise InputError(f"{out}: is the {what} {path}; choose another --out")
        if _within(other, res):
            raise InputError(f"{out}: holds the {what} {path}; choose another --out")
        if _within(res, other):
            raise InputError(f"{out}: is inside the {what} {path}; choose another --out")


def check_export_target(
    out: Path, pred_dir: Path, overwrite: bool, inputs: Mapping[str, Path | None] | None = None
) -> None:
    """Raise :class:`InputError` unless ``out`` may be written by ``export-cvat``; ``inputs``
    (e.g. ``data.source``, the photos) must not be touched either (:func:`check_apart`)."""
    res, pred = Path(os.path.abspath(out)), Path(os.path.abspath(pred_dir))
    if _within(pred, res) or _within(Path.cwd(), res):
        raise InputError(
            f"{out}: holds the predictions folder or the current folder; choose a new --out"
        )
    check_apart(out, {"predictions folder": pred_dir, **(inputs or {})})
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink():
        raise InputError(f"{out}: is a symlink; choose a new --out")
    zip_out = out.suffix.lower() == ".zip"
    if out.is_dir():
        if zip_out:
            raise InputError(f"{out}: is a folder, not a .zip; choose a new --out")
        if not any(out.iterdir()):
            return
        if not overwrite:
            raise InputError(
                f"{out}: exists and is not empty; pass --overwrite to replace an earlier export"
            )
        if not (out / EXPORT_MARKER).is_file():
            raise InputError(
                f"{out}: not a folder written by opensam export-cvat; refusing to replace it"
            )
        return
    if not zip_out or not out.is_file():
        raise InputError(f"{out}: is a file; --out must be a .zip or a folder")
    if not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    if not zipfile.is_zipfile(out):
        raise InputError(f"{out}: is not a zip file; refusing to replace it")
    if not _written_by_export(out):
        raise InputError(f"{out}: not a zip written by opensam export-cvat; refusing to replace it")


def _written_by_export(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.comment == EXPORT_ZIP_COMMENT
    except (OSError, zipfile.BadZipFile):
        return False


def check_predict_out(out: Path) -> None:
    """``opensam predict --out`` must be a folder (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out must be a folder")


def _owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _open_locked(lock: Path) -> int | None:
    """Open ``lock`` and hold ``flock(LOCK_EX)`` on it: the fd, or None when a live process
    holds it. The kernel drops a dead process's flock, so a lock left by a killed run is free,
    and of several processes taking it over at once exactly one wins. A lock file unlinked by
    its releasing holder between our open and flock is detected (another inode) and reopened."""
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_owner(fd: int, lock: Path) -> None:
    if os.fstat(fd).st_size:
        log.warning("%s: lock of a finished process, taking it over", lock)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


@contextlib.contextmanager
def output_lock(folder: Path, what: str = "opensam predict") -> Iterator[Path]:
    """Hold ``folder/.opensam.lock`` (``flock``, with the owner's pid and host inside) for the
    block; released (and removed) on exit.

    Raises :class:`InputError` naming the lock when another live process holds it."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(lock)
        if fd is not None:
            _write_owner(fd, lock)
    except OSError as exc:
        raise InputError(f"{folder}: cannot write ({exc.strerror or exc})") from None
    if fd is None:
        owner = _owner(lock)
        who = f"pid {owner['pid']} on {owner.get('host')}" if owner else "a process"
        raise InputError(
            f"{lock}: {folder} is in use by another {what} ({who}); wait for it to finish"
        )
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it: a waiter then sees another inode
        os.close(fd)
