"""opensam report: experiments grouped by every param but seed, mean ± std per column."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from opensam.apps.cli import main as cli_main
from opensam.apps.report import (
    Run,
    flatten,
    format_report,
    format_results_page,
    group_runs,
    is_experiment_ref,
    mean_std,
    read_experiments,
    same_run_params,
    with_new_params,
    write_results_page,
)


def _eval(control: float, student: float) -> dict:
    def block(v: float) -> dict:
        return {"with_masks": {"test": {"miou": v}, "val": {"miou": v}}}

    return {
        "control": block(control),
        "teacher": block(50.0),
        "student": block(student),
        "gain": {"test": {"miou": round(student - control, 2)}},
    }


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    assert mean_std([2.0]) == "2.00 ±  -"
    assert mean_std([]) == "-"


def test_flatten_and_grouping_ignore_only_the_seed() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": 2}) == {"a.b": 1, "a.c": [1, 2], "d": 2}
    runs = [Run(f"e{s}{r}", {"seed": s, "ratio": r, "x": 1}, {}) for s in (0, 1, 2) for r in (1, 8)]
    groups = group_runs(runs)
    assert sorted(groups) == [(("ratio", "1"),), (("ratio", "8"),)]
    assert all(len(v) == 3 for v in groups.values())


def test_format_report_rows() -> None:
    runs = [Run("a", {"seed": 0}, _eval(60, 64)), Run("b", {"seed": 1}, _eval(62, 64))]
    table = format_report(runs)
    row = table.splitlines()[2]
    assert row.startswith("| (all equal) | 0,1 | 61.00 ± 1.41 | 50.00 ± 0.00 | 64.00 ± 0.00")
    assert "| 3.00 ± 1.41 |" in row
    assert "no finished experiments" in format_report([])


def test_report_quotes_huge_values_short_and_skips_nan_metrics(tmp_path: Path) -> None:
    runs = [Run("a", {"seed": 0, "x": "y" * 10**6}, _eval(60, 64)),
            Run("b", {"seed": 0, "x": "z" * 10**6}, _eval(float("nan"), 64))]  # fmt: skip
    table = format_report(runs)
    assert max(len(line) for line in table.splitlines()) < 300
    assert "nan" not in table
    _init_repo(tmp_path)  # an experiment whose params.yaml is an alias bomb is skipped
    bomb = Path(__file__).parent / "fixtures" / "params_alias_bomb.yaml"
    (tmp_path / "params.yaml").write_bytes(bomb.read_bytes())
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(_eval(60, 64)))
    (tmp_path / "metrics" / "pseudo.json").write_text("{}")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "bomb")
    assert read_experiments(tmp_path) == []


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _init_repo(repo: Path) -> None:
    """An empty git repository with a committer and a metrics folder."""
    _git(repo, "init", "-q")
    for key, value in (("user.email", "t@t"), ("user.name", "t")):
        _git(repo, "config", key, value)
    (repo / "metrics").mkdir()


def test_read_experiments_from_git_refs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _init_repo(tmp_path)
    for seed, (control, student) in enumerate([(60.0, 63.0), (61.0, 65.0)]):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "ratio": 2}))
        (tmp_path / "metrics" / "eval.json").write_text(json.dumps(_eval(control, student)))
        (tmp_path / "metrics" / "pseudo.json").write_text(
            json.dumps({"vs_hidden_gt": {"miou": 50}})
        )
        _git(tmp_path, "add", "-A")
        _git(tmp_path, "commit", "-qm", f"seed {seed}")
        _git(
            tmp_path,
            "update-ref",
            f"refs/exps/ab/{'c' * 38}/exp-{seed}",
            _git(tmp_path, "rev-parse", "HEAD"),
        )
    head = _git(tmp_path, "rev-parse", "HEAD")
    for ref in ("refs/exps/exec/EXEC_HEAD", "refs/exps/celery/stash", "refs/exps/celery/failed"):
        _git(tmp_path, "update-ref", ref, head)  # DVC's bookkeeping: queued, failed, running
    runs = read_experiments(tmp_path)
    # HEAD is seed 1's commit: the same params as exp-1, so one run
    assert sorted(r.name for r in runs) == ["HEAD", "exp-0"]
    assert cli_main(["report", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        "| 0,1 | 60.50 ± 0.71 |" in out and "| 3.50 ± 0.71 |" in out and "| 50.00 ± 0.00 |" in out
    )


def test_the_committed_baseline_is_a_run_of_its_own(tmp_path: Path) -> None:
    """`dvc repro` + commit, then `dvc exp run -S seed=1`: both seeds are in the report."""
    _init_repo(tmp_path)
    for seed, (control, student) in enumerate([(60.0, 63.0), (62.0, 66.0)]):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "ratio": 2}))
        (tmp_path / "metrics" / "eval.json").write_text(json.dumps(_eval(control, student)))
        (tmp_path / "metrics" / "pseudo.json").write_text(json.dumps({}))
        _git(tmp_path, "add", "-A")
        _git(tmp_path, "commit", "-qm", f"seed {seed}")
        if seed == 1:  # an experiment on top of the seed-0 baseline, which stays HEAD
            _git(
                tmp_path,
                "update-ref",
                f"refs/exps/ab/{'c' * 38}/seed1",
                _git(tmp_path, "rev-parse", "HEAD"),
            )
            _git(tmp_path, "reset", "-q", "--hard", "HEAD~1")
    runs = read_experiments(tmp_path)
    assert sorted((r.name, r.params["seed"]) for r in runs) == [("HEAD", 0), ("seed1", 1)]
    row = format_report(runs).splitlines()[2]
    assert "| 0,1 | 61.00 ± 1.41 |" in row and "| 3.50 ± 0.71 |" in row


def test_only_finished_experiment_refs_count() -> None:
    sha = "93/ca2f6b8a7fae134509000fbf7e54a653463fc4"
    assert is_experiment_ref(f"refs/exps/{sha}/seed1")
    for ref in (
        "refs/exps/celery/stash",
        "refs/exps/celery/failed",
        "refs/exps/exec/EXEC_HEAD",
        "refs/heads/main",
        f"refs/exps/{sha}",
    ):
        assert not is_experiment_ref(ref), ref


def _page_run(name: str, seed: int, labelled: int | None, ratio: int, student: float) -> Run:
    metrics = _eval(60.0, student)
    metrics["oracle"] = {"with_masks": {"test": {"miou": 64.0}}}
    metrics["gap_closed"] = {"test": {"percent": round(100 * (student - 60) / 4, 2)}}
    metrics["pseudo"] = {"vs_hidden_gt": {"miou": 90.0}, "coverage": 48.5}
    params = {"seed": seed, "labelled_train": labelled, "ratio": ratio, "student.mode": "online",
              "data.split.train": 60}  # fmt: skip
    return Run(name, params, metrics)


def test_results_page_rows_and_commands(tmp_path: Path) -> None:
    base = _page_run("HEAD", 0, None, 2, 61.0)
    runs = [base, _page_run("s1", 1, None, 2, 63.0),
            _page_run("a", 0, 15, 8, 62.0), _page_run("b", 1, 15, 8, 62.0)]  # fmt: skip
    page = format_results_page(runs, base)
    rows = [line for line in page.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2
    # sorted by labelled count: 15 first; gap closed (62 - 60) / (64 - 60) = 50 %
    assert rows[0].startswith("| 15 | 8 | online | - | 2 | 60.00 ± 0.00 | 50.00 ± 0.00 |")
    assert "| 50.00 ± 0.00 | 90.00 ± 0.00 (on 48.5 % of the pixels) |" in rows[0]
    assert rows[1].startswith("| 60 | 2 | online | - | 2 |") and "| 50.00 ± 35.36 |" in rows[1]
    assert (
        "`dvc exp run --queue -S labelled_train=15 -S ratio=8 -S seed=0,1 && dvc queue start`"
        in page
    )
    assert "`dvc exp run --queue -S seed=0,1 && dvc queue start`" in page
    assert "coverage" in page.lower() and "no finished" in format_results_page([]).lower()
    target = tmp_path / "results.md"
    target.write_text("# Results\n\nhand-written\n")
    write_results_page(target, "one")
    write_results_page(target, "two")  # replaces its own section, keeps the rest
    text = target.read_text()
    assert "hand-written" in text and "two" in text and "one" not in text
    assert text.count("<!-- experiments -->") == 1


def test_labelled_train_of_the_whole_split_is_the_baselines_row() -> None:
    whole = _page_run("s1", 1, 60, 2, 63.0)  # -S labelled_train=60 of a 60-image split
    assert same_run_params(whole.params)["labelled_train"] is None
    part = _page_run("a", 0, 15, 8, 62.0)
    assert same_run_params(part.params) == part.params
    base = _page_run("HEAD", 0, None, 2, 61.0)
    runs = [base, Run("s1", same_run_params(whole.params), whole.metrics), part]
    rows = [ln for ln in format_results_page(runs, base).splitlines() if ln.startswith("| ")]
    assert len(rows) - 1 == 2  # 15/8 and one 60/2 row of two seeds, not a third row
    assert any(r.startswith("| 60 | 2 | online | - | 2 |") for r in rows)


def test_a_column_with_fewer_seeds_than_its_row_says_how_many() -> None:
    runs = [_page_run("a", 0, 15, 8, 62.0), _page_run("b", 1, 15, 8, 61.0)]
    runs[1].metrics["gap_closed"]["test"]["percent"] = None  # that seed's oracle: no gap
    row = [ln for ln in format_results_page(runs).splitlines() if ln.startswith("| 15")][0]
    assert "| 50.00 ±  - (1 of 2) |" in row  # the gap closed of seed 0 alone
    assert "| 61.50 ± 0.71 |" in row  # the student: both seeds, no count


def test_the_archive_rebuilds_the_page_after_the_experiment_refs_are_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two finished experiments, saved by --archive; their refs deleted (another clone, dvc exp
    gc): the page has the same rows from the archive, each with the commit it was run from."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _init_repo(repo)
    for seed, student in ((0, 62.0), (1, 64.0)):
        (repo / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "ratio": 8}))
        (repo / "metrics" / "eval.json").write_text(json.dumps(_eval(60.0, student)))
        (repo / "metrics" / "pseudo.json").write_text(json.dumps({"ignored_fraction": 0.5}))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", f"seed {seed}")
        head = _git(repo, "rev-parse", "HEAD")
        _git(repo, "update-ref", f"refs/exps/ab/{'c' * 38}/s{seed}", head)
    _git(repo, "reset", "-q", "--hard", "HEAD~1")  # the baseline: seed 0's commit
    page, archive = tmp_path / "results.md", tmp_path / "results.json"
    args = ["report", "--repo", str(repo), "--write", str(page), "--archive", str(archive)]
    assert cli_main(args) == 0
    before = page.read_text()
    assert "| 2 | 60.00 ± 0.00 |" in before and "run at " in before
    assert "ab" + "c" * 5 in before  # seed 1's run: its baseline's commit (the ref's sha)
    for seed in (0, 1):
        _git(repo, "update-ref", "-d", f"refs/exps/ab/{'c' * 38}/s{seed}")
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 5, "ratio": 2}))
    (repo / "metrics" / "eval.json").write_text(json.dumps(_eval(70.0, 71.0)))
    _git(repo, "commit", "-qam", "a new baseline")
    assert cli_main(args) == 0
    after = page.read_text()
    rows = [line for line in after.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # header, ratio 2 (the new HEAD), ratio 8 (both saved seeds)
    assert any("| 2 | 60.00 ± 0.00 |" in r and "| 63.00 ± 1.41 |" in r for r in rows)
    saved = json.loads(archive.read_text())["runs"]
    assert len(saved) == 3 and all(r["name"] != "HEAD" and r["commit"] for r in saved)
    archive.write_text('{"runs": [{"name": "x"}]}')
    assert cli_main(args) == 2
    assert f"error: {archive}: run 0 needs" in capsys.readouterr().err
    archive.write_text("not json")
    assert cli_main(args) == 2
    assert f"error: {archive}: not a readable JSON runs archive" in capsys.readouterr().err
    assert page.read_text() == after  # a bad archive writes nothing


def test_a_param_added_since_a_run_takes_the_baselines_value() -> None:
    """A run saved before ``student.perturbation`` existed ran as its default does: it groups
    with today's baseline, while a run that set the param keeps its own value and row."""
    head = Run("HEAD", {"seed": 0, "ratio": 2, "student.perturbation": "dropout"}, _eval(60, 61))
    old = Run("s1", {"seed": 1, "ratio": 2}, _eval(62, 63), "abc")
    lever = Run("c0", {"seed": 0, "ratio": 2, "student.perturbation": "complementary"}, {})
    filled = with_new_params([head, old, lever], head)
    assert filled[1].params == {"seed": 1, "ratio": 2, "student.perturbation": "dropout"}
    assert filled[1].commit == "abc" and filled[2] == lever and filled[0] == head
    groups = group_runs(filled)
    assert sorted(len(members) for members in groups.values()) == [1, 2]
    assert with_new_params([old], None) == [old]
    # after the default changes, the old run still ran the code before the param: dropout
    later = Run("HEAD", {**head.params, "student.perturbation": "complementary"}, head.metrics)
    assert with_new_params([old], later)[0].params["student.perturbation"] == "dropout"


def test_other_params_name_only_what_differs_from_the_baseline() -> None:
    """A lever row names its param; the rows at the default value say ``-`` and come first."""
    base = _page_run("HEAD", 0, None, 2, 61.0)
    base.params["student.perturbation"] = "dropout"
    runs = [base]
    for seed, value in ((1, "dropout"), (0, "complementary"), (1, "complementary")):
        run = _page_run(f"{value}{seed}", seed, 15, 8, 62.0)
        run.params["student.perturbation"] = value
        runs.append(run)
    page = format_results_page(runs, base)
    rows = [ln for ln in page.splitlines() if ln.startswith("| 15")]
    assert [r.split(" | ")[3] for r in rows] == ["-", "student.perturbation=complementary"]
    assert "-S student.perturbation=complementary -S seed=0,1" in page
    # without a baseline every param that differs between the rows is named
    rows = [ln for ln in format_results_page(runs[1:]).splitlines() if ln.startswith("| 15")]
    assert {r.split(" | ")[3] for r in rows} == {
        "student.perturbation=dropout",
        "student.perturbation=complementary",
    }
