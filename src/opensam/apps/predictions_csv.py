"""``predictions.csv`` of a prediction folder, its one owner: columns, reading back (a file a
user may have edited: checked row by row) and atomic rewriting.

Columns: id, path, width, height, pct_<class> (pixel share, %), mean_confidence (mean max
probability, 0..1), low_conf_pct (% of pixels below ``low_conf``); layout of the whole folder in
:mod:`opensam.apps.predict`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opensam.errors import InputError, quote
from opensam.runtime import atomic_path

CSV_NAME = "predictions.csv"


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv``."""
    pct = [f"pct_{name}" for name in class_names]
    return ["id", "path", "width", "height", *pct, "mean_confidence", "low_conf_pct"]


def read_rows(pred_dir: Path, class_names: Sequence[str] | None = None) -> dict[str, dict]:
    """Rows of ``pred_dir/predictions.csv`` by id ({} if absent). With ``class_names``, a CSV
    whose columns differ raises :class:`InputError`."""
    path = Path(pred_dir) / CSV_NAME
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if class_names is not None and reader.fieldnames != csv_columns(class_names):
                raise InputError(
                    f"{path}: written for other classes; use --overwrite or a new folder"
                )
            rows = {}
            for row in reader:
                if row.get("id"):
                    _check_row(path, reader.line_num, row)
                    rows[row["id"]] = row
            return rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a predictions CSV ({type(exc).__name__})") from None


def _check_row(path: Path, line: int, row: Mapping[str, Any]) -> None:
    """A row read back (maybe hand-edited): a plain file-name id and a confidence in 0..1."""
    image_id = row["id"]
    if "/" in image_id or "\\" in image_id or image_id.startswith(".") or "\0" in image_id:
        raise InputError(f"{path}: line {line}: id {quote(image_id)} is not a plain file name")
    try:
        conf = float(row.get("mean_confidence") or "nan")
    except ValueError:
        conf = math.nan
    if not 0.0 <= conf <= 1.0:
        got = quote(row.get("mean_confidence"))
        raise InputError(f"{path}: line {line}: mean_confidence must be in 0..1, got {got}")


def write_rows(
    out_dir: Path, rows: Iterable[Mapping[str, Any]], class_names: Sequence[str]
) -> None:
    """Rewrite ``out_dir/predictions.csv`` atomically, rows sorted by id."""
    with atomic_path(Path(out_dir) / CSV_NAME) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(class_names), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: str(r["id"])))
