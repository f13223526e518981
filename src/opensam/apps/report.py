"""``opensam report``: mean ± std over seeds of the finished DVC experiments.

Every experiment DVC has run in this repository (``refs/exps/...``, e.g. from
``dvc exp run --queue -S seed=0,1,2`` and ``dvc queue start``) is read from git: its
``params.yaml`` and ``metrics/eval.json``, and so is the committed baseline (``HEAD``, the row
``dvc exp show`` calls workspace/main once ``dvc.lock`` and the metrics are committed). Runs with
identical params are one run (the pipeline is deterministic; ``dvc exp run`` of the baseline's
params, e.g. ``-S seed=0`` in a seed sweep, is not counted twice). Experiments whose params
differ only in ``seed`` form
one row; the columns are the mean ± sample standard deviation (n - 1) of the test mIoU of the
control, the teacher and the student (with masks), of the gain (student − control) and of the
pseudo-label mIoU against the hidden ground truth, with the share of the pool's pixels it
covers (the rest is below the confidence threshold and not counted). Single runs show ``±  -``.

``opensam report --write docs/results.md`` writes the results page instead
(:func:`format_results_page`): one row per (labelled train count, ratio, student mode), any
other differing params beside them, with the oracle and the gap closed
(``metrics/eval.json``'s ``gap_closed``), the number of seeds, and the ``dvc exp run`` command
that reproduces the row. It replaces the text between ``<!-- experiments -->`` and
``<!-- /experiments -->`` (appended when the page has no such markers; the rest of the page is
kept).

``--archive FILE`` keeps the runs beside the page: the runs saved in FILE (when it exists) are
merged with the repository's, a run read from git replacing a saved one with the same params,
and FILE is written back. The page can then be rebuilt where the experiments' refs are gone
(another clone, ``dvc exp gc``, a new machine), and each run keeps the commit it was run from.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opensam.config import read_yaml
from opensam.errors import InputError, quote

log = logging.getLogger(__name__)

MAX_CELL = 40  # characters of a param value shown in the table
COLUMNS = (
    ("control", ("control", "with_masks", "test", "miou")),
    ("teacher", ("teacher", "with_masks", "test", "miou")),
    ("student", ("student", "with_masks", "test", "miou")),
    ("gain test", ("gain", "test", "miou")),
    ("gain val", ("gain", "val", "miou")),
    ("oracle", ("oracle", "with_masks", "test", "miou")),
    ("gap closed % test", ("gap_closed", "test", "percent")),
    ("pseudo", ("pseudo", "vs_hidden_gt", "miou")),
    ("pseudo coverage %", ("pseudo", "coverage")),
)
BEGIN, END = "<!-- experiments -->", "<!-- /experiments -->"
# the results page's row key and its metric columns (test split, with masks)
ROW_KEYS = ("labelled_train", "ratio", "student.mode")
PAGE_COLUMNS = (
    ("control", ("control", "with_masks", "test", "miou")),
    ("teacher", ("teacher", "with_masks", "test", "miou")),
    ("student", ("student", "with_masks", "test", "miou")),
    ("oracle", ("oracle", "with_masks", "test", "miou")),
    ("gain", ("gain", "test", "miou")),
    ("gap closed %", ("gap_closed", "test", "percent")),
)


@dataclass(frozen=True)
class Run:
    """One finished experiment: its name, flattened params and metrics."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    commit: str | None = None  # the commit the run was made from (an experiment's baseline)


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
    value = float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None
    return value if value is not None and math.isfinite(value) else None  # NaN: not a result


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


def short(value: Any) -> str:
    """A param value for a table cell: at most a short prefix of it (never 80 MB of YAML)."""
    return value if isinstance(value, str) and len(value) <= MAX_CELL else quote(value, MAX_CELL)


def format_report(runs: Sequence[Run]) -> str:
    """A markdown table, one row per group of seeds."""
    if not runs:
        return "no finished experiments (run e.g. dvc exp run --queue -S seed=0,1,2)"
    groups = group_runs(runs)
    heads = ["params", "seeds", *(name for name, _ in COLUMNS)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key, members in sorted(groups.items()):
        label = ", ".join(f"{k}={short(json.loads(v))}" for k, v in key) or "(all equal)"
        seeds = ",".join(sorted(str(r.params.get("seed")) for r in members))
        cells = []
        for _, path in COLUMNS:
            vals = [v for r in members if (v := _get(r.metrics, path)) is not None]
            cells.append(mean_std(vals))
        lines.append("| " + " | ".join([label, seeds, *cells]) + " |")
    return "\n".join(lines)


def _git(repo: Path, *args: str, check: bool = True) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise InputError(f"{repo}: git {' '.join(args[:2])} failed ({exc})") from None
    return done.stdout


def _read_run(
    repo: Path, name: str, sha: str, eval_path: str, commit: str | None = None
) -> Run | None:
    """The run committed at ``sha``, or None (logged) when it lacks params or metrics."""
    try:
        params = read_yaml(_git(repo, "show", f"{sha}:params.yaml"), f"{name}: params.yaml")
        metrics = json.loads(_git(repo, "show", f"{sha}:{eval_path}"))
        pseudo = json.loads(_git(repo, "show", f"{sha}:metrics/pseudo.json"))
    except InputError as exc:  # also an alias bomb or duplicate keys in its params.yaml
        log.warning("%s; skipped", str(exc)[:200])
        return None
    except (ValueError, yaml.YAMLError):
        log.warning("%s: no params.yaml or %s; skipped", name, eval_path)
        return None
    if not isinstance(params, Mapping) or not isinstance(metrics, dict):
        log.warning("%s: params.yaml or %s is not a mapping; skipped", name, eval_path)
        return None
    if isinstance(pseudo, dict):  # the share of the pool's pixels the quality is measured on
        ignored = _get(pseudo, ("ignored_fraction",))
        if ignored is not None:
            pseudo["coverage"] = round(100.0 * (1.0 - ignored), 2)
    metrics["pseudo"] = pseudo
    return Run(name, same_run_params(flatten(params)), metrics, commit)


def same_run_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``labelled_train`` equal to the whole train split written as ``null``:
    the two train on the same images with the same epochs, so ``-S labelled_train=60`` groups
    (and deduplicates) with the baseline's ``null`` instead of forming a row of its own."""
    if params.get("labelled_train") is not None and params.get("labelled_train") == params.get(
        "data.split.train"
    ):
        return params | {"labelled_train": None}
    return params


def is_experiment_ref(ref: str) -> bool:
    """A finished experiment's ref, ``refs/exps/<baseline sha[:2]>/<sha[2:]>/<name>``; not
    DVC's own bookkeeping (``refs/exps/celery/stash`` holds queued runs, ``celery/failed``
    failed ones, ``exec/`` running ones: their commits carry the params but not the results)."""
    parts = ref.split("/")
    return (
        len(parts) == 5
        and parts[:2] == ["refs", "exps"]
        and re.fullmatch(r"[0-9a-f]{2}", parts[2]) is not None
        and re.fullmatch(r"[0-9a-f]{38}", parts[3]) is not None
    )


def read_experiments(repo: Path, eval_path: str = "metrics/eval.json") -> list[Run]:
    """The committed baseline (``HEAD``) and every DVC experiment of ``repo`` with both
    ``params.yaml`` and ``eval_path``; of runs with identical params, the first is kept."""
    refs = _git(repo, "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)")
    found: list[tuple[str, str, str]] = []  # name, the run's commit, the commit it was run from
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).strip()
    if head:
        found.append(("HEAD", "HEAD", head))
    for line in refs.splitlines():
        ref, sha = line.rsplit(" ", 1)
        if is_experiment_ref(ref):
            parts = ref.split("/")
            found.append((parts[-1], sha, parts[2] + parts[3]))
    runs: dict[str, Run] = {}
    for name, sha, baseline in found:
        if (run := _read_run(repo, name, sha, eval_path, baseline)) is not None:
            runs.setdefault(_params_key(run), run)
    return list(runs.values())


def _params_key(run: Run) -> str:
    return json.dumps(run.params, sort_keys=True, default=str)


def _archived_name(name: str, commit: str | None) -> str:
    """A saved baseline is named by its commit: the repository's ``HEAD`` stays the only one."""
    return name if name != "HEAD" else f"baseline {str(commit)[:7]}"


# params added after runs were saved, each with the value that reproduces what the code did
# before it existed: a run that lacks one ran that way, whatever today's default is
VALUE_BEFORE_PARAM = {"student.perturbation": "dropout"}


def with_new_params(runs: Sequence[Run], baseline: Run | None) -> list[Run]:
    """``runs`` with each param they lack filled in: from :data:`VALUE_BEFORE_PARAM` where the
    param is listed there, else from ``baseline`` (the repository's ``HEAD``; a new param's
    default keeps the old behaviour). So a run saved before ``student.perturbation`` groups with
    the ``dropout`` runs, even after the default changes, instead of forming a row, or a
    duplicate seed, of its own."""
    if baseline is None:
        return list(runs)
    before = {k: v for k, v in VALUE_BEFORE_PARAM.items() if k in baseline.params}
    return [
        r if baseline.params.keys() <= r.params.keys()
        else Run(r.name, baseline.params | before | r.params, r.metrics, r.commit)
        for r in runs
    ]  # fmt: skip


def merge_runs(fresh: Sequence[Run], saved: Sequence[Run]) -> list[Run]:
    """``fresh`` and the ``saved`` runs whose params no fresh run has (fresh ones win: a rerun
    of the same params under newer code replaces the saved figure)."""
    keys = {_params_key(r) for r in fresh}
    return [*fresh, *(r for r in saved if _params_key(r) not in keys)]


def load_archive(path: Path) -> list[Run]:
    """The runs saved by :func:`save_archive` (none when ``path`` does not exist); a saved
    baseline is named by its commit, so the repository's ``HEAD`` stays the only baseline."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON runs archive ({exc})") from None
    entries = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(f'{path}: not a runs archive (no "runs" list)')
    runs = []
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str)
        ok = ok and isinstance(entry.get("params"), dict) and isinstance(entry.get("metrics"), dict)
        commit = entry.get("commit") if isinstance(entry, dict) else None
        if not ok or not (commit is None or isinstance(commit, str)):
            raise InputError(f"{path}: run {i} needs a name, params and metrics (and a commit)")
        runs.append(
            Run(
                _archived_name(entry["name"], commit),
                same_run_params(entry["params"]),
                entry["metrics"],
                commit,
            )
        )
    return runs


def save_archive(path: Path, runs: Sequence[Run]) -> None:
    """Write ``runs`` to ``path`` (atomically), sorted by params, for :func:`load_archive`."""
    from opensam.runtime import atomic_path

    entries = [
        {"name": _archived_name(r.name, r.commit),
         "commit": r.commit, "params": r.params, "metrics": r.metrics}
        for r in sorted(runs, key=_params_key)
    ]  # fmt: skip
    text = json.dumps({"runs": entries}, indent=1, sort_keys=True, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def labelled_count(params: Mapping[str, Any]) -> Any:
    """The labelled train images of a run: ``labelled_train``, else ``data.split.train``."""
    value = params.get("labelled_train")
    return params.get("data.split.train") if value is None else value


def _param_value(value: Any) -> str:
    """A value as ``dvc exp run -S key=value`` takes it (YAML)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def exp_command(
    members: Sequence[Run], baseline: Mapping[str, Any] | None, varying: Sequence[str] = ()
) -> str:
    """The ``dvc exp run`` line that reproduces a row: every param in which the row differs
    from the baseline (``-S key=value``; without a baseline, the ``varying`` ones), then its
    seeds."""
    first = members[0].params
    if baseline is None:
        keys = sorted(k for k in varying if k in first)
    else:
        keys = sorted(k for k in first if k != "seed" and baseline.get(k) != first[k])
    sets = [f"-S {shlex.quote(f'{k}={short(_param_value(first[k]))}')}" for k in keys]
    seeds = ",".join(sorted({str(r.params.get("seed")) for r in members}, key=_seed_key))
    return " ".join(["dvc exp run --queue", *sets, f"-S seed={seeds}", "&& dvc queue start"])


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.isdigit() else (2**63, seed)


def other_params(key: Sequence[tuple[str, str]], baseline: Mapping[str, Any] | None) -> str:
    """A row's params beside labelled count, ratio and mode: those of its group ``key`` (from
    :func:`group_runs`) whose value is not the baseline's (all of them without a baseline), so
    a row at the defaults says ``-`` even where another row changes a param."""
    return ", ".join(
        f"{k}={short(json.loads(v))}"
        for k, v in key
        if k not in ROW_KEYS and (baseline is None or json.dumps(baseline.get(k)) != v)
    )


def _sort_key(params: Mapping[str, Any], other: str) -> tuple[str, ...]:
    values = [labelled_count(params), params.get("ratio"), params.get("student.mode")]
    return tuple(f"{v:>12}" if isinstance(v, int) else str(v) for v in values) + (other,)


def format_results_page(runs: Sequence[Run], baseline: Run | None = None) -> str:
    """The results page's experiments section: one row per group of seeds (the groups of
    :func:`group_runs`), keyed by labelled train count, ratio and student mode (any other
    differing param in its own column), with mean ± std over seeds of the test mIoU (with
    masks) of control, teacher, student and oracle, the gain, the gap closed, the warm teacher's
    pseudo-labels with their coverage, and the command of each row."""
    if not runs:
        return "No finished experiments yet (`dvc exp run --queue -S seed=0,1,2`)."
    groups = group_runs(runs)
    heads = [
        "labelled train",
        "ratio",
        "mode",
        "other params",
        "seeds",
        *(name for name, _ in PAGE_COLUMNS),
        "pseudo-labels (coverage)",
    ]
    lines = [
        "Test mIoU in percent (with region masks), mean ± sample std over the seeds of each row;",
        "gain = student − control; gap closed = 100 · (student − control) / (oracle − control),",
        "the mean of the seeds where the oracle is above the control (`-` where there is none;",
        "`(n of m)`: a column's figure over n of the row's m seeds);",
        "pseudo-labels: the warm teacher's offline pseudo-labels against the pool's hidden ground",
        "truth, on the share of the pool's pixels above the confidence threshold (the rest is",
        "not counted).",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    commands = []
    baseline_params = baseline.params if baseline is not None else None
    rows = [(other_params(key, baseline_params), key, members) for key, members in groups.items()]
    rows.sort(key=lambda row: _sort_key(row[2][0].params, row[0]))
    for other, key, members in rows:
        params = members[0].params
        labelled = short(labelled_count(params))
        cells = [
            str(labelled),
            short(params.get("ratio")),
            short(params.get("student.mode")),
            other or "-",
            str(len(members)),
        ]
        for _, path in PAGE_COLUMNS:
            values = [v for r in members if (v := _get(r.metrics, path)) is not None]
            counted = (
                f" ({len(values)} of {len(members)})" if 0 < len(values) < len(members) else ""
            )
            cells.append(mean_std(values) + counted)  # e.g. gap closed: seeds with a gap only
        quality = [v for r in members if (v := _get(r.metrics, COLUMNS[-2][1])) is not None]
        cover = [v for r in members if (v := _get(r.metrics, COLUMNS[-1][1])) is not None]
        pseudo = mean_std(quality)  # the coverage even with no quality (0 %: nothing kept)
        if cover:
            pseudo += f" (on {statistics.fmean(cover):.1f} % of the pixels)"
        elif quality:
            pseudo += " (coverage unknown)"
        cells.append(pseudo)
        lines.append("| " + " | ".join(cells) + " |")
        row = f"labelled {labelled}, ratio {short(params.get('ratio'))}"
        row += f", {short(params.get('student.mode'))}" + (f", {other}" if other else "")
        commits = sorted({r.commit[:7] for r in members if r.commit})
        row += f" (run at {', '.join(commits)})" if commits else ""
        varying = [k for k, _ in key]
        commands.append(f"- {row}: `{exp_command(members, baseline_params, varying)}`")
    return "\n".join([*lines, "", "The commands of the rows:", "", *commands])


def write_results_page(path: Path, section: str) -> None:
    """Put ``section`` between the markers of ``path`` (appended when it has none; the page is
    created when missing), written atomically."""
    from opensam.runtime import atomic_path

    block = f"{BEGIN}\n{section}\n{END}"
    try:
        text = path.read_text() if path.exists() else "# Results\n"
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Experiments (`opensam report --write`)\n" + block + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
