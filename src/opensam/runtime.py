"""Process-level helpers shared by stage scripts and the CLI: logging, seeding, atomic outputs."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from opensam.errors import InputError

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure root logging once (stages and the CLI call this; the library never does)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def seed_rngs(seed: int) -> None:
    """Seed python's, numpy's and torch's global random-number generators (a run's start)."""
    import torch  # lazy: demo/prepare worker processes never need torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_everything(seed: int, threads: int | None = None) -> None:
    """:func:`seed_rngs`, and fix torch's thread count for CPU determinism."""
    import torch  # lazy: demo/prepare worker processes never need torch

    seed_rngs(seed)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun ranks share cores
    n = (
        threads
        if threads is not None
        else int(os.environ.get("OPENSAM_THREADS", (os.cpu_count() or 1) // local))
    )
    torch.set_num_threads(max(1, n))


WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.EFBIG,
    }
)


def os_error_line(exc: OSError) -> str | None:
    """``'<file>: <reason>'`` for a file-system error a user can fix (a full disk, a read-only
    folder, a file where a folder should be), else None (a bug: let it raise)."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    return f"{exc.filename or 'output'}: {exc.strerror or exc.__class__.__name__}"


def stage_parser(doc: str | None, *paths: str) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its docstring ``doc`` as description, a required
    ``--<name> PATH`` for each of ``paths``, and ``--params`` (default ``params.yaml``); a stage
    adds its other flags to the parser it gets."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n", 1)[0])
    for name in paths:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run a stage ``main``; an :class:`InputError` (or a full disk, a read-only output, ...)
    becomes one line on stderr and exit code 2."""
    setup_logging()
    try:
        code = main(None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except OSError as exc:
        if (line := os_error_line(exc)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _tmp_name(final: Path) -> Path:
    """Per-process temporary name: two runs writing the same output never share one."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Remove temporaries of ``final`` left by killed runs (``.<name>.<pid>.tmp`` whose process
    is gone, and the older ``.<name>.tmp``); a live run's temporary is left alone."""
    prefix = f".{final.name}."
    with contextlib.suppress(OSError):
        for sibling in final.parent.iterdir():
            middle = sibling.name[len(prefix) : -len(".tmp")]
            if not sibling.name.startswith(prefix) or not sibling.name.endswith(".tmp"):
                continue
            if sibling.name == f".{final.name}.tmp" or (
                middle.isdigit() and int(middle) != os.getpid() and not _pid_alive(int(middle))
            ):
                remove_path(sibling)


def write_error(final: Path, tmp: Path, exc: OSError) -> InputError:
    """One-line error for ``exc`` raised while writing ``final`` through ``tmp``."""
    name = exc.filename
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if name and not str(name).startswith(str(tmp)) and Path(name) != final:
        return InputError(f"{name}: {reason}")  # another file (a photo read for the output)
    return InputError(f"{final}: cannot write ({reason})")


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``. A file never replaces a folder or a folder a file, and a
    folder is swapped in before the old one is removed (the final name is never missing)."""
    if final.is_dir() and not final.is_symlink():
        if not tmp.is_dir():
            raise InputError(f"{final}: is a folder, refusing to replace it with a file")
        if Path.cwd().resolve().is_relative_to(final.resolve()):
            raise InputError(f"{final}: holds the current folder, refusing to replace it")
        old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        remove_path(old)
    elif tmp.is_dir() and (final.exists() or final.is_symlink()):
        raise InputError(f"{final}: is a file, refusing to replace it with a folder")
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``final`` (file or directory).

    On any exception the temporary is removed and ``final`` is left as it was, so a reader never
    sees a half-written output under the final name. A write that fails for a reason the user
    can fix (full disk, read-only folder) becomes an :class:`InputError` naming ``final``. The
    temporary name is per process; a folder never replaces a file (nor a file a folder).
    """
    final = Path(os.path.abspath(final)) if Path(final).name in ("", ".", "..") else Path(final)
    tmp = _tmp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    try:
        _remove_stale_temporaries(final)
        remove_path(tmp)
        yield tmp
        _replace(tmp, final)
    except OSError as exc:
        remove_path(tmp)
        raise write_error(final, tmp, exc) from None
    except BaseException:
        remove_path(tmp)
        raise


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically, in bytes that depend on ``obj`` alone.

    Saved to a path, torch names the zip's records after the file, here the per-process
    temporary (``.teacher.pt.<pid>.tmp/data.pkl``), so two runs that trained the same weights
    wrote different bytes and DVC hashes, and every stage downstream reran. Through an open
    handle the records are ``archive/...``, the same in every run."""
    import torch  # lazy: demo/prepare worker processes never need torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def write_json(path: str | Path, value: Any) -> None:
    """``value`` as indented JSON (a metrics file, a summary) to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def remove_path(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_json(path: Path, missing: str) -> Any:
    """The JSON value in ``path``; InputError naming it when it is missing (``missing`` says what
    to do), unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found ({missing})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from None
