"""End to end through DVC itself, on a tiny copy of the project (tests/pipeline_project.py):
the full `dvc repro` writes every metric, a second one changes nothing, the predict pipeline,
and the ratio-experiment workflow of the README (a queued sweep, `exp show`, `exp diff`,
`metrics diff`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from pipeline_project import BIN, reset, run, shared_project, stages_run

from opensam.apps.cli import main as cli_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_project(tmp_path_factory, "proj")


def test_repro_writes_every_metric(project: Path) -> None:
    for name in ("data", "zeroshot", "warmup", "pseudo", "student", "control", "oracle", "eval"):
        assert (project / "metrics" / f"{name}.json").is_file(), name
    shown = json.loads(run(project, str(BIN / "dvc"), "metrics", "show", "--json"))
    text = json.dumps(shown)
    for key in ("zeroshot.json", "warmup.json", "student.json", "eval.json", "miou"):
        assert key in text
    gain = json.loads((project / "metrics" / "eval.json").read_text())["gain"]
    assert set(gain) == {"train", "val", "test"} and isinstance(gain["test"]["miou"], float)
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert "oracle" in evaluation and set(evaluation["gap_closed"]) == set(gain)
    for split, entry in evaluation["gap_closed"].items():  # a number, or null with its reason
        assert (entry["percent"] is None) == ("reason" in entry), entry
        assert entry["student_minus_control"] == gain[split]["miou"]
    assert (project / "data" / "masks.h5").is_file()
    grid = yaml.safe_load((project / "params.yaml").read_text())["ablation"]
    stores = len(grid["pps"]) * len(grid["min_region_area"])
    assert stores > 1 and len(list((project / "data" / "ablation").glob("*.h5"))) == stores


def test_second_repro_changes_nothing(project: Path) -> None:
    out = run(project, str(BIN / "dvc"), "repro")
    assert stages_run(out) == set()
    assert "up to date" in out.lower()


def test_predict_pipeline_is_off_the_main_path(project: Path) -> None:
    dvc = str(BIN / "dvc")
    reset(project)
    assert "predict" not in run(project, dvc, "repro", "--dry")
    out = run(project, dvc, "repro", "predict/dvc.yaml")
    assert stages_run(out) == {"predict/dvc.yaml:predict"}
    summary = json.loads((project / "metrics" / "predict.json").read_text())
    assert summary["images"] == 12
    assert len(list((project / "data" / "predictions" / "labels").glob("*.png"))) == 12


def test_queued_ratio_sweep_compares(project: Path) -> None:
    """The README's ratio workflow: a queued sweep, then `exp show`, `exp diff` and
    `metrics diff` between its runs; ratio 3 reruns only the stages that depend on it."""
    dvc = str(BIN / "dvc")
    reset(project)
    run(project, dvc, "exp", "run", "--queue", "-S", "ratio=1,3", "-n", "sweep")
    run(project, dvc, "queue", "start")
    deadline = time.time() + 600
    status = ""
    while time.time() < deadline:
        status = run(project, dvc, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, run(project, dvc, "queue", "logs", "sweep-2", check=False)
    assert status.count("Success") >= 2, status
    assert stages_run(run(project, dvc, "queue", "logs", "sweep-1")) == set()  # ratio 1: cached
    logs = run(project, dvc, "queue", "logs", "sweep-2")
    # every unlabelled pixel counts in the tiny project, so the ratio-3 student differs
    assert stages_run(logs) == {"pseudolabel", "student", "oracle", "evaluate"}, logs[-3000:]
    shown = run(project, dvc, "exp", "show", "--json")
    assert "sweep-1" in shown and "sweep-2" in shown
    diff = json.loads(run(project, dvc, "exp", "diff", "sweep-1", "sweep-2", "--json"))
    ratio = diff["params"]["params.yaml"]["ratio"]
    assert (ratio["old"], ratio["new"]) == (1, 3)
    assert "metrics/eval.json" in diff["metrics"], diff["metrics"]
    assert "miou" in run(project, dvc, "metrics", "diff", "sweep-1", "sweep-2")
    # the results page from these finished experiments: the baseline (ratio 1 = sweep-1) and
    # sweep-2 (ratio 3), each row with its command
    page = project / "docs" / "results.md"
    assert cli_main(["report", "--repo", str(project), "--write", str(page)]) == 0
    text = page.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 4 | ")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "3"], text
    assert "-S ratio=3 -S seed=0 && dvc queue start`" in text
    assert all(" % of the pixels) |" in r for r in rows), rows  # pseudo-labels: their coverage
