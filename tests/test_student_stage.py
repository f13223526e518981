"""Smoke tests of stages/student.py: 2 self-training rounds on a tiny project (opensam-tiny)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_datasets import CLASSES, write_tiny_project
from test_warmup_stage import load_stage

from opensam.config import load_params
from opensam.errors import InputError
from opensam.model.segmenter import build_model, load_checkpoint, save_checkpoint
from opensam.train.pseudo_labels import generate_pseudo_labels


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Stages call seed_everything, which takes OPENSAM_THREADS; two OpenMP threads on a busy
    2-core machine spin against each other, so these smoke tests use one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSAM_THREADS", "1")
        yield
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny project with an (untrained) teacher and its pseudo-labels of the ratio-1 pool."""
    p = write_tiny_project(tmp_path_factory.mktemp("student"), 4, 2, 2, 6, size=48)
    params = load_params(p["params"])
    torch.manual_seed(0)
    model = build_model(params.clip, params.prompts)
    teacher = p["prepared"].parent / "models" / "teacher.pt"
    save_checkpoint(teacher, model, params.class_names, params.clip, 48, epoch=1)
    pool = json.loads(p["splits"].read_text())["unlabelled"][:4]  # ratio 1 × 4 train images
    pseudo = p["prepared"].parent / "pseudo"
    generate_pseudo_labels(model, p["prepared"], pool, p["masks"], pseudo, None, 4)
    return {**p, "teacher": teacher, "pseudo": pseudo}


def student_args(p: dict[str, Path], out: Path) -> list[str]:
    return [
        "--prepared", str(p["prepared"]), "--masks", str(p["masks"]),
        "--data-metrics", str(p["data"]), "--teacher", str(p["teacher"]),
        "--pseudo", str(p["pseudo"]), "--out", str(out / "models" / "student.pt"),
        "--metrics", str(out / "metrics" / "student.json"), "--live", str(out / "live"),
        "--params", str(p["params"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(project: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run1")
    assert load_stage("student").main(student_args(project, out)) == 0
    return out


def test_student_writes_its_outputs(first_run: Path) -> None:
    report = json.loads((first_run / "metrics" / "student.json").read_text())
    assert list(report) == ["iter1", "iter2", "best"]
    for r in ("iter1", "iter2"):
        assert 0.0 <= report[r]["train"]["miou"] <= 100.0
        assert 0.0 <= report[r]["val"]["miou"] <= 100.0
        assert 0.0 <= report[r]["pseudo"]["miou"] <= 100.0  # vs the hidden ground truth
    best = report["best"]
    assert best["iter"] in (1, 2)
    assert best["val"] == report[f"iter{best['iter']}"]["val"]
    assert best["val"]["miou"] == max(report[r]["val"]["miou"] for r in ("iter1", "iter2"))
    assert set(best["test"]["iou"]) == set(CLASSES)
    _, meta = load_checkpoint(first_run / "models" / "student.pt", expected_classes=CLASSES)
    assert meta["iteration"] == best["iter"]
    rows = (first_run / "live" / "plots" / "metrics" / "val" / "miou.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2  # two rounds of one epoch, one step axis
    assert sorted(p.name for p in (first_run / "models").iterdir()) == ["student.pt"]


def test_student_resumes_after_a_kill_in_round_two(
    project: dict[str, Path], first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = load_stage("student")
    real, calls = stage.train_round, []

    class Killed(Exception):
        pass

    def train_round(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args)

    monkeypatch.setattr(stage, "train_round", train_round)
    with pytest.raises(Killed):
        stage.main(student_args(project, tmp_path))
    assert (tmp_path / "models" / ".student_ckpt" / "iter1" / "last.pt").is_file()
    assert load_stage("student").main(student_args(project, tmp_path)) == 0
    resumed = json.loads((tmp_path / "metrics" / "student.json").read_text())
    assert resumed == json.loads((first_run / "metrics" / "student.json").read_text())
    a = torch.load(first_run / "models" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "models" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_needs_the_pools_pseudo_labels(project: dict[str, Path], tmp_path: Path) -> None:
    params = project["params"].read_text().replace("ratio: 1", "ratio: 2")
    (tmp_path / "params.yaml").write_text(params)
    args = student_args(project, tmp_path)
    args[args.index("--params") + 1] = str(tmp_path / "params.yaml")
    with pytest.raises(InputError, match="pseudo"):
        load_stage("student").main(args)
    assert not (tmp_path / "models" / "student.pt").exists()
