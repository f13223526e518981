"""End to end through DVC itself, on a tiny copy of the project (tests/pipeline_project.py):
the full `dvc repro` writes every metric, a second one changes nothing, the predict pipeline,
and the ratio-experiment workflow of the README (named experiments, diff, a queued sweep).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from pipeline_project import BIN, build_project, run, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(tmp_path_factory.mktemp("proj"))


def test_repro_writes_every_metric(project: Path) -> None:
    for name in ("data", "zeroshot", "warmup", "pseudo", "student", "control", "eval"):
        assert (project / "metrics" / f"{name}.json").is_file(), name
    shown = json.loads(run(project, str(BIN / "dvc"), "metrics", "show", "--json"))
    text = json.dumps(shown)
    for key in ("zeroshot.json", "warmup.json", "student.json", "eval.json", "miou"):
        assert key in text
    gain = json.loads((project / "metrics" / "eval.json").read_text())["gain"]
    assert set(gain) == {"train", "val", "test"} and isinstance(gain["test"]["miou"], float)
    assert (project / "data" / "masks.h5").is_file()
    assert len(list((project / "data" / "ablation").glob("*.h5"))) == 8


def test_second_repro_changes_nothing(project: Path) -> None:
    out = run(project, str(BIN / "dvc"), "repro")
    assert stages_run(out) == set()
    assert "up to date" in out.lower()


def test_predict_pipeline_is_off_the_main_path(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    assert "predict" not in run(project, dvc, "repro", "--dry")
    out = run(project, dvc, "repro", "predict/dvc.yaml")
    assert stages_run(out) == {"predict/dvc.yaml:predict"}
    summary = json.loads((project / "metrics" / "predict.json").read_text())
    assert summary["images"] == 12
    assert len(list((project / "data" / "predictions" / "labels").glob("*.png"))) == 12


def test_ratio_experiments_compare(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    run(project, dvc, "exp", "run", "-S", "ratio=1", "-n", "r1")
    run(project, dvc, "exp", "run", "-S", "ratio=3", "-n", "r3")
    shown = run(project, dvc, "exp", "show", "--json")
    assert "r1" in shown and "r3" in shown
    diff = json.loads(run(project, dvc, "exp", "diff", "r1", "r3", "--json"))
    ratio = diff["params"]["params.yaml"]["ratio"]
    assert (ratio["old"], ratio["new"]) == (1, 3)
    assert "metrics/student.json" in diff["metrics"] or "metrics/eval.json" in diff["metrics"]
    mdiff = run(project, dvc, "metrics", "diff", "r1", "r3")
    assert "miou" in mdiff


def test_queued_ratio_sweep(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    run(project, dvc, "exp", "run", "--queue", "-S", "ratio=1,2", "-n", "sweep")
    run(project, dvc, "queue", "start")
    deadline = time.time() + 600
    status = ""
    while time.time() < deadline:
        status = run(project, dvc, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, run(project, dvc, "queue", "logs", "sweep-1", check=False)
    assert status.count("Success") >= 2, status
