"""User-facing errors: one line that names the file and the problem, never a traceback."""

from __future__ import annotations

import contextlib
import reprlib
from collections.abc import Iterator

MAX_QUOTE_CHARS = 60  # a message quotes at most this much of a value


class InputError(Exception):
    """Bad user input (a file, a param, a checkpoint). The message is one line: 'path: problem'."""


class TrainingDiverged(InputError):
    """A training loss that is NaN or infinite: the run stops, naming the epoch (the stage adds
    the params file: a too high learning rate, or bad inputs, are to blame)."""


_REPR = reprlib.Repr()  # bounded at every level: never walks a whole alias bomb
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``...`` marks a cut), for messages.

    Never builds the whole repr: a YAML alias bomb or a 100 MB string costs microseconds, and an
    error line stays one short line whatever the value (also for non-UTF-8 or control chars)."""
    text = _REPR.repr(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def params_blamed(params_file: object, block: str) -> Iterator[None]:
    """Re-raise a :class:`TrainingDiverged` of the block as ``<params file>: <block>: epoch N:
    ...``: the one-line error names the file whose values (e.g. ``lr_max``) the user can fix."""
    try:
        yield
    except TrainingDiverged as exc:
        raise InputError(f"{params_file}: {block}: {exc}") from None
