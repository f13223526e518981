"""Guards around the console script's outputs: what ``--out`` may replace, and output locks.

- :func:`check_export_target`: ``opensam export-cvat --out`` never deletes what it did not
  write. An existing output is refused unless ``--overwrite``; even then only a .zip file, or a
  folder holding the :data:`EXPORT_MARKER` that a directory export writes, is replaced.
- :func:`output_lock`: ``opensam predict`` holds ``<out>/.opensam.lock`` while it writes, so a
  second run into the same folder stops with one line instead of losing CSV rows. A lock left
  by a killed run (its process is gone, on this host) is detected and taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from opensam.data.cvat import EXPORT_MARKER
from opensam.errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".opensam.lock"
UNREADABLE_LOCK_STALE_S = 60.0  # a lock without a readable owner older than this is stale


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: Path, pred_dir: Path, overwrite: bool) -> None:
    """Raise :class:`InputError` unless ``out`` may be written by ``export-cvat``."""
    res, pred = Path(os.path.abspath(out)), Path(os.path.abspath(pred_dir))
    if _within(pred, res) or _within(Path.cwd(), res):
        raise InputError(
            f"{out}: holds the predictions folder or the current folder; choose a new --out"
        )
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
    if not zip_out:
        raise InputError(f"{out}: is a file; --out must be a .zip or a folder")
    if not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    if not zipfile.is_zipfile(out):
        raise InputError(f"{out}: is not a zip file; refusing to replace it")


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


def _is_stale(lock: Path, owner: dict | None) -> bool:
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_STALE_S
        except OSError:
            return True  # gone meanwhile
    if owner.get("host") != socket.gethostname():
        return False  # cannot tell: another machine's process
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take(lock: Path) -> None:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info) + "\n")


@contextlib.contextmanager
def output_lock(folder: Path, what: str = "opensam predict") -> Iterator[Path]:
    """Hold ``folder/.opensam.lock`` (created atomically) for the block; released on exit.

    Raises :class:`InputError` naming the lock when another live process holds it."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                _take(lock)
                break
            except FileExistsError:
                owner = _owner(lock)
                if not _is_stale(lock, owner):
                    who = f"pid {owner['pid']} on {owner.get('host')}" if owner else "a process"
                    raise InputError(
                        f"{lock}: {folder} is in use by another {what} ({who}); wait for it "
                        "to finish, or delete this file if that process is gone"
                    ) from None
                log.warning("%s: stale lock of a finished process, taking it over", lock)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
        else:
            raise InputError(f"{lock}: could not take the output lock")
    except OSError as exc:
        raise InputError(f"{folder}: cannot write ({exc.strerror or exc})") from None
    try:
        yield lock
    finally:
        owner = _owner(lock)
        if owner is not None and owner.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()
