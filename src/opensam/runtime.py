"""Process-level helpers shared by stage scripts and the CLI: logging, seeding, atomic outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from opensam.errors import InputError

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure root logging once (stages and the CLI call this; the library never does)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch, and fix torch's thread count for CPU determinism."""
    import torch  # lazy: demo/prepare worker processes never need torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun ranks share cores
    n = (
        threads
        if threads is not None
        else int(os.environ.get("OPENSAM_THREADS", (os.cpu_count() or 1) // local))
    )
    torch.set_num_threads(max(1, n))


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run a stage ``main``; an :class:`InputError` becomes one line on stderr and exit code 2."""
    setup_logging()
    try:
        code = main(None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``final`` (file or directory).

    On any exception the temporary is removed and ``final`` is left as it was, so a reader never
    sees a half-written output under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(final)
    os.replace(tmp, final)


def remove_path(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
