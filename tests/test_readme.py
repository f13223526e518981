"""README.md is a user's guide: short, in a fixed order, its results table generated from
metrics/, and no line of it names a commit or tells the history of the code's development."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTIONS = [
    "Quick start",
    "The pipeline",
    "Current results",
    "The offline demo",
    "Using your own data",
    "Using real weights",
    "Experiments",
    "Label new photos",
    "Resuming and bad input",
    "Links",
]
# a word of 7 to 40 hex digits with a digit and a letter in it: an abbreviated or full commit
COMMIT = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])")
HISTORY = re.compile(
    r"\b(this round|earlier round|previous round|this session|earlier|used to|no longer|"
    r"was|were)\b",
    re.IGNORECASE,
)


def _tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools/results_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_table"] = module
    spec.loader.exec_module(module)
    return module


results_table = _tool()


def test_readme_is_at_most_250_lines() -> None:
    assert len(README.splitlines()) <= 250


@pytest.mark.parametrize(
    ("line", "bad"),
    [
        ("fresh clone of `9b77a3d`", True),
        ("commit 65e428bd0f1c", True),
        ("sam_vit_h_4b8939.pth", False),
        ("laion2b_s13b_b82k", False),
        ("1024x683", False),
    ],
)
def test_commit_pattern(line: str, bad: bool) -> None:
    assert bool(COMMIT.search(line)) is bad


def test_readme_names_no_commit_and_tells_no_history() -> None:
    commits = [line for line in README.splitlines() if COMMIT.search(line)]
    assert not commits, commits
    history = [line for line in README.splitlines() if HISTORY.search(line)]
    assert not history, history


def test_sections_come_in_the_users_order() -> None:
    headings = [line for line in README.splitlines() if line.startswith("## ")]
    found = [next((i for i, h in enumerate(headings) if s in h), -1) for s in SECTIONS]
    assert -1 not in found, dict(zip(SECTIONS, found, strict=True))
    assert found == sorted(found), headings


def test_first_screen_shows_the_two_commands() -> None:
    first = "\n".join(README.splitlines()[:40])
    assert "<!-- run-command -->" in first and "<!-- test-command -->" in first
    for marker in ("run-command", "test-command"):
        lines = README.splitlines()
        at = lines.index(f"<!-- {marker} -->")
        assert lines[at + 1] == "```bash" and lines[at + 3] == "```"


def test_results_table_is_the_committed_metrics() -> None:
    assert results_table.main(["--check"]) == 0, "run: python tools/results_table.py"


def test_results_table_follows_the_metrics(tmp_path: Path) -> None:
    """Another student mIoU in metrics/eval.json changes the table, and --check says so."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "metrics", tmp_path / "metrics", ignore=shutil.ignore_patterns("live"))
    path = tmp_path / "metrics" / "eval.json"
    metrics = json.loads(path.read_text())
    metrics["student"]["with_masks"]["test"]["miou"] = 12.34
    path.write_text(json.dumps(metrics))
    root = ["--root", str(tmp_path)]
    assert results_table.main(["--check", *root]) == 1
    assert results_table.main(root) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| student (self-training) | " in text and "| 12.34 |" in text
    assert results_table.main(["--check", *root]) == 0
