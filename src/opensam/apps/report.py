"""``opensam report``: mean ± std over seeds of the finished DVC experiments.

Every experiment DVC has run in this repository (``refs/exps/...``, e.g. from
``dvc exp run --queue -S seed=0,1,2`` and ``dvc queue start``) is read from git: its
``params.yaml`` and ``metrics/eval.json``. Experiments whose params differ only in ``seed`` form
one row; the columns are the mean ± sample standard deviation (n - 1) of the test mIoU of the
control, the teacher and the student (with masks), of the gain (student − control) and of the
pseudo-label mIoU against the hidden ground truth. Single runs show ``±  -``.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opensam.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = (
    ("control", ("control", "with_masks", "test", "miou")),
    ("teacher", ("teacher", "with_masks", "test", "miou")),
    ("student", ("student", "with_masks", "test", "miou")),
    ("gain test", ("gain", "test", "miou")),
    ("gain val", ("gain", "val", "miou")),
    ("pseudo", ("pseudo", "vs_hidden_gt", "miou")),
)


@dataclass(frozen=True)
class Run:
    """One finished experiment: its name, flattened params and metrics."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> float | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def mean_std(values: Sequence[float]) -> str:
    """``"61.20 ± 0.85"`` (sample std), ``"61.20 ±  -"`` for one value, ``"-"`` for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else " -"
    return f"{mean:.2f} ± {std}"


def group_runs(runs: Iterable[Run]) -> dict[tuple[tuple[str, Any], ...], list[Run]]:
    """Runs grouped by every param except ``seed`` (key: the sorted differing items)."""
    runs = list(runs)
    keys = sorted({k for r in runs for k in r.params} - {"seed"})
    varying = [k for k in keys if len({json.dumps(r.params.get(k)) for r in runs}) > 1]
    groups: dict[tuple[tuple[str, Any], ...], list[Run]] = {}
    for run in runs:
        key = tuple((k, json.dumps(run.params.get(k))) for k in varying)
        groups.setdefault(key, []).append(run)
    return groups


def format_report(runs: Sequence[Run]) -> str:
    """A markdown table, one row per group of seeds."""
    if not runs:
        return "no finished experiments (run e.g. dvc exp run --queue -S seed=0,1,2)"
    groups = group_runs(runs)
    heads = ["params", "seeds", *(name for name, _ in COLUMNS)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key, members in sorted(groups.items()):
        label = ", ".join(f"{k}={json.loads(v)}" for k, v in key) or "(all equal)"
        seeds = ",".join(sorted(str(r.params.get("seed")) for r in members))
        cells = []
        for _, path in COLUMNS:
            vals = [v for r in members if (v := _get(r.metrics, path)) is not None]
            cells.append(mean_std(vals))
        lines.append("| " + " | ".join([label, seeds, *cells]) + " |")
    return "\n".join(lines)


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise InputError(f"{repo}: git {' '.join(args[:2])} failed ({exc})") from None
    return done.stdout


def read_experiments(repo: Path, eval_path: str = "metrics/eval.json") -> list[Run]:
    """Every DVC experiment of ``repo`` with both ``params.yaml`` and ``eval_path``."""
    refs = _git(repo, "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)")
    runs = []
    for line in refs.splitlines():
        ref, sha = line.rsplit(" ", 1)
        if "/exec/" in ref or ref.endswith("_HEAD"):
            continue
        try:
            params = yaml.safe_load(_git(repo, "show", f"{sha}:params.yaml"))
            metrics = json.loads(_git(repo, "show", f"{sha}:{eval_path}"))
            pseudo = json.loads(_git(repo, "show", f"{sha}:metrics/pseudo.json"))
        except (InputError, ValueError, yaml.YAMLError):
            log.warning("%s: no params.yaml or %s; skipped", ref, eval_path)
            continue
        metrics["pseudo"] = pseudo
        runs.append(Run(ref.rsplit("/", 1)[-1], flatten(params), metrics))
    return runs
