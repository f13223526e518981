"""Smoke tests of stages/student.py on a tiny project (opensam-tiny); the rounds themselves are
tested in tests/test_self_training.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    CLASSES,
    SCENE_COLOURS,
    assert_miou_is_the_mean_iou,
    load_stage,
    write_student_project,
)

from opensam.errors import InputError
from opensam.model.segmenter import load_checkpoint, read_checkpoint_meta

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny project with an (untrained) teacher and its pseudo-labels of the ratio-1 pool."""
    return write_student_project(tmp_path_factory.mktemp("student"))


def student_args(p: dict[str, Path], out: Path) -> list[str]:
    return [
        "--prepared", str(p["prepared"]), "--masks", str(p["masks"]),
        "--data-metrics", str(p["data"]), "--teacher", str(p["teacher"]),
        "--pseudo", str(p["pseudo"]), "--out", str(out / "models" / "student.pt"),
        "--metrics", str(out / "metrics" / "student.json"), "--live", str(out / "live"),
        "--params", str(p["params"]),
    ]  # fmt: skip


def test_student_writes_its_outputs(project: dict[str, Path], tmp_path: Path) -> None:
    assert load_stage("student").main(student_args(project, tmp_path)) == 0
    report = json.loads((tmp_path / "metrics" / "student.json").read_text())
    assert list(report) == ["iter1", "iter2", "best"]
    for r in ("iter1", "iter2"):
        for part in ("train", "val", "pseudo"):  # pseudo: vs the hidden ground truth
            assert_miou_is_the_mean_iou(report[r][part])
    best = report["best"]
    assert best["iter"] in (1, 2)
    assert best["val"] == report[f"iter{best['iter']}"]["val"]
    assert best["val"]["miou"] == max(report[r]["val"]["miou"] for r in ("iter1", "iter2"))
    assert set(best["test"]["iou"]) == set(CLASSES)
    _, meta = load_checkpoint(tmp_path / "models" / "student.pt", expected_classes=CLASSES)
    assert meta["iteration"] == best["iter"]
    teacher = read_checkpoint_meta(project["teacher"])
    assert meta["masks"] == teacher["masks"]  # the store it was trained on: the teacher's
    assert meta["labelmap_colors"] == SCENE_COLOURS.tolist()
    rows = (tmp_path / "live" / "plots" / "metrics" / "val" / "miou.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2  # two rounds of one epoch, one step axis
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["student.pt"]


def test_student_needs_the_pools_pseudo_labels(project: dict[str, Path], tmp_path: Path) -> None:
    params = project["params"].read_text().replace("ratio: 1", "ratio: 2")
    (tmp_path / "params.yaml").write_text(params)
    args = student_args(project, tmp_path)
    args[args.index("--params") + 1] = str(tmp_path / "params.yaml")
    with pytest.raises(InputError, match="pseudo"):
        load_stage("student").main(args)
    assert not (tmp_path / "models" / "student.pt").exists()
