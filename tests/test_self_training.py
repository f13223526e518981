"""opensam.train.self_training: the noisy-student rounds, their best-round choice, the relabelling
of the pool by the best student so far, and kill-and-resume (tiny project, opensam-tiny)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLASSES, assert_miou_is_the_mean_iou, write_student_project
from torch import nn

import opensam.train.self_training as st
from opensam.config import load_params
from opensam.prepared import read_prepared
from opensam.train.engine import TrainConfig
from opensam.train.losses import resolve_class_weights
from opensam.train.pseudo_format import load_pseudo_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_student_project(tmp_path_factory.mktemp("rounds"))


def setup(p: dict[str, Path]) -> tuple[st.SelfTrainingInputs, Any, Any, TrainConfig]:
    """(inputs, student params, pseudo params, base train config) as the student stage builds
    them."""
    params = load_params(p["params"])
    prepared = read_prepared(p["prepared"])
    pool = tuple(prepared.pool_ids(params.ratio))
    inputs = st.SelfTrainingInputs(
        prepared, p["masks"], p["teacher"], p["pseudo"], pool, tuple(CLASSES)
    )
    cfg = params.student
    weights = resolve_class_weights(cfg.class_weights, CLASSES, p["data"])
    return inputs, cfg, params.pseudo, TrainConfig.from_params(cfg, weights, params.seed)


@pytest.fixture(scope="module")
def clean_run(
    project: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[st.SelfTrainingResult, Path]:
    ckpt_root = tmp_path_factory.mktemp("clean") / ".student_ckpt"
    inputs, cfg, pseudo, base = setup(project)
    return st.run_self_training(inputs, cfg, pseudo, base, ckpt_root), ckpt_root


def test_rounds_report_the_best_student(
    project: dict[str, Path], clean_run: tuple[st.SelfTrainingResult, Path]
) -> None:
    result, ckpt_root = clean_run
    report = result.report
    assert list(report) == ["iter1", "iter2", "best"]
    for r in ("iter1", "iter2"):
        assert set(report[r]) == {"train", "val", "pseudo"}
        assert_miou_is_the_mean_iou(report[r]["pseudo"])  # vs the hidden ground truth
    vals = [report[f"iter{r}"]["val"]["miou"] for r in (1, 2)]
    assert result.best_round == (1 if vals[0] >= vals[1] else 2)
    assert result.best_val == max(vals) == report["best"]["val"]["miou"]
    assert report["best"]["iter"] == result.best_round and "test" in report["best"]
    # the returned model holds the best round's weights: it scores that round's val again
    inputs, cfg, _, _ = setup(project)
    again = st.score_splits(inputs, result.model, cfg, ("val",))
    assert again["val"] == report[f"iter{result.best_round}"]["val"]
    # round 2 trained on the pool relabelled by round 1's student (kept for a resume)
    assert load_pseudo_ids(ckpt_root / "pseudo2") == list(inputs.pool_ids)
    assert (ckpt_root / "iter1" / "last.pt").is_file() and (ckpt_root / "iter2").is_dir()


def test_rounds_resume_after_a_kill_in_round_two(
    project: dict[str, Path],
    clean_run: tuple[st.SelfTrainingResult, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, calls = st.train_round, []

    class Killed(Exception):
        pass

    def train_round(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args)

    inputs, cfg, pseudo, base = setup(project)
    ckpt_root = tmp_path / ".student_ckpt"
    monkeypatch.setattr(st, "train_round", train_round)
    with pytest.raises(Killed):
        st.run_self_training(inputs, cfg, pseudo, base, ckpt_root)
    assert (ckpt_root / "iter1" / "last.pt").is_file()
    monkeypatch.setattr(st, "train_round", real)
    resumed = st.run_self_training(inputs, cfg, pseudo, base, ckpt_root)
    clean = clean_run[0]
    assert resumed.report == clean.report and resumed.best_round == clean.best_round
    a, b = clean.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class Scalar(nn.Module):
    """A stand-in student: one weight, set to its round number."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), value))


def test_best_round_ties_and_relabelling_teacher(
    project: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With training and scoring stubbed: val 50, 60, 60 → round 2 (ties keep the earlier); each
    relabelling uses the best student so far; round r trains on ``pseudo<r>`` with seed + r."""
    inputs, cfg, pseudo, base = setup(project)
    cfg = dataclasses.replace(cfg, iterations=3)
    vals, trained, relabelled = {1: 50.0, 2: 60.0, 3: 60.0}, [], []

    def train_round(inputs_, cfg_, config, pseudo_dir, ckpt_dir, live):  # noqa: ANN001, ANN202
        r = len(trained) + 1
        trained.append((config.seed, pseudo_dir, ckpt_dir))
        return Scalar(float(r))

    def score_splits(inputs_, model, cfg_, splits):  # noqa: ANN001, ANN202
        r = int(model.w.item())
        return {s: {"miou": vals[r] if s == "val" else float(r)} for s in splits}

    def relabel_pool(inputs_, state, pseudo_, out):  # noqa: ANN001, ANN202
        relabelled.append((int(state["w"].item()), out))
        return {"miou": 1.0}

    monkeypatch.setattr(st, "train_round", train_round)
    monkeypatch.setattr(st, "score_splits", score_splits)
    monkeypatch.setattr(st, "relabel_pool", relabel_pool)
    monkeypatch.setattr(st, "measure_pseudo_quality", lambda *a: {"miou": 2.0})
    root = tmp_path / "ckpt"
    result = st.run_self_training(inputs, cfg, pseudo, base, root)
    assert (result.best_round, result.best_val) == (2, 60.0)
    assert int(result.model.w.item()) == 2  # the best round's weights were restored
    assert trained == [
        (base.seed + 1, inputs.pseudo, root / "iter1"),
        (base.seed + 2, root / "pseudo2", root / "iter2"),
        (base.seed + 3, root / "pseudo3", root / "iter3"),
    ]
    assert relabelled == [(1, root / "pseudo2"), (2, root / "pseudo3")]
    assert result.report["iter1"]["pseudo"] == {"miou": 2.0}  # round 1: measured
    assert result.report["iter2"]["pseudo"] == {"miou": 1.0}  # from the relabelling
    assert result.report["best"] == {"iter": 2, "val": {"miou": 60.0}, "test": {"miou": 2.0}}


def test_zero_rounds_is_an_error(project: dict[str, Path], tmp_path: Path) -> None:
    inputs, cfg, pseudo, base = setup(project)
    with pytest.raises(ValueError, match="iterations"):
        st.run_self_training(inputs, dataclasses.replace(cfg, iterations=0), pseudo, base, tmp_path)
