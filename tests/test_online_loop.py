"""The online loop on a tiny project (opensam-tiny, 48 px): determinism, kill-and-resume, the
control, and the student / control stages in online mode."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import assert_miou_is_the_mean_iou, load_stage, write_tiny_project

from opensam.config import StudentParams, load_params
from opensam.eval.evaluation import build_loader, predict_loader
from opensam.images import read_label_png
from opensam.model.segmenter import OpenSamModel, build_model, save_checkpoint
from opensam.prepared import read_prepared
from opensam.train import engine
from opensam.train.online_setup import online_config, run_online
from opensam.train.pseudo_labels import generate_pseudo_labels


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSAM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    p: dict[str, Any] = write_tiny_project(tmp_path_factory.mktemp("online"), 4, 2, 2, 6, size=48)
    params = load_params(p["params"])
    torch.manual_seed(0)
    model = build_model(params.clip, params.prompts)
    teacher = p["prepared"].parent / "models" / "teacher.pt"
    save_checkpoint(teacher, model, params.class_names, params.clip, 48, epoch=1)
    splits = json.loads(p["splits"].read_text())
    pseudo = p["prepared"].parent / "pseudo"
    generate_pseudo_labels(model, p["prepared"], splits["unlabelled"][:4], p["masks"], pseudo,
                           None, 4)  # fmt: skip
    return {**p, "teacher": teacher, "pseudo": pseudo, "splits_dict": splits, "model": model}


# lr_max 1e-4: AdamW's first steps move every weight by about lr_max whatever its gradient, and
# at 1e-3 the untrained opensam-tiny overshoots (its epoch-1 train loss rises above the initial
# model's, and the val-selected teacher is that epoch's); at 1e-4 the loss falls in both runs
CFG = StudentParams(epochs=2, batch_size=2, lr_max=1e-4, conf_threshold=0.0, drop_path=0.0)


def _run(
    project: dict[str, Any], ckpt: Path | None, control: bool = False, cfg: StudentParams = CFG
) -> OpenSamModel:
    model: OpenSamModel = build_model(load_params(project["params"]).clip, ["a"] * 4)
    model.load_state_dict(project["model"].state_dict())
    config = online_config(cfg, None, 3, control=control)
    pool = project["splits_dict"]["unlabelled"][:4]
    prepared = read_prepared(project["prepared"])
    run_online(model, cfg, config, prepared, project["masks"], pool, ckpt, None)
    return model


def _same(a: OpenSamModel, b: OpenSamModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(project: dict[str, Any]) -> OpenSamModel:
    return _run(project, None)


def _labelled_train_loss(model: OpenSamModel, project: dict[str, Any]) -> float:
    """Mean per-pixel NLL of ``model`` (with masks) on the labelled train images."""
    prepared = read_prepared(project["prepared"])
    loader = build_loader(model, prepared.root, list(prepared.train), None, project["masks"], 4)
    total, pixels = 0.0, 0
    for ids, log_probs in predict_loader(model, loader, True):
        for i, image_id in enumerate(ids):
            label = torch.from_numpy(read_label_png(prepared.label_path(image_id)).astype("int64"))
            nll = torch.nn.functional.nll_loss(
                log_probs[i : i + 1].float(), label[None], ignore_index=255, reduction="sum"
            )
            total, pixels = total + float(nll), pixels + int((label != 255).sum())
    return total / pixels


def test_online_run_is_deterministic_and_trains(
    project: dict[str, Any], reference: OpenSamModel
) -> None:
    assert _same(_run(project, None), reference)
    assert not _same(reference, project["model"])  # it trained
    assert not _same(_run(project, None, control=True), reference)  # λ = 0 differs


def test_complementary_views_train_deterministically_and_differ_from_dropout(
    project: dict[str, Any], reference: OpenSamModel
) -> None:
    """UniMatch V2's two CutMix views with complementary channels: a run of its own (not the
    dropout view's), seeded, and it learns the labelled images."""
    cfg = dataclasses.replace(CFG, perturbation="complementary")
    first = _run(project, None, cfg=cfg)
    assert _same(_run(project, None, cfg=cfg), first)
    assert not _same(first, reference)
    assert _labelled_train_loss(first, project) < _labelled_train_loss(project["model"], project)


def test_online_run_lowers_the_labelled_loss(
    project: dict[str, Any], reference: OpenSamModel
) -> None:
    """Learning, not merely change: the loss on the labelled train images falls, for the
    student and for its labelled-only control (the kept EMA teachers)."""
    before = _labelled_train_loss(project["model"], project)
    assert _labelled_train_loss(reference, project) < before
    assert _labelled_train_loss(_run(project, None, control=True), project) < before


def test_online_run_resumes_after_a_kill(
    project: dict[str, Any], reference: OpenSamModel, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    real, calls = engine.train_epoch, []

    class Killed(Exception):
        pass

    def epoch(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args)

    monkeypatch.setattr(engine, "train_epoch", epoch)
    with pytest.raises(Killed):
        _run(project, tmp_path)
    assert (tmp_path / "last.pt").is_file()
    monkeypatch.setattr(engine, "train_epoch", real)
    with caplog.at_level("INFO", logger="opensam.train.engine"):
        assert _same(_run(project, tmp_path), reference)
    assert "resumed from" in caplog.text  # really resumed (weights_only load), not started over


def _args(p: dict[str, Any], out: Path, params: Path, stage: str) -> list[str]:
    args = [
        "--prepared", str(p["prepared"]), "--masks", str(p["masks"]),
        "--data-metrics", str(p["data"]), "--teacher", str(p["teacher"]),
        "--out", str(out / "models" / f"{stage}.pt"),
        "--metrics", str(out / "metrics" / f"{stage}.json"), "--live", str(out / "live"),
        "--params", str(params),
    ]  # fmt: skip
    return args + (["--pseudo", str(p["pseudo"])] if stage == "student" else [])


def test_online_student_and_control_stages(project: dict[str, Any], tmp_path: Path) -> None:
    raw = yaml.safe_load(project["params"].read_text())
    raw["student"].update(mode="online", conf_threshold=0.0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert load_params(params).student.mode == "online"
    for stage in ("student", "control"):
        assert load_stage(stage).main(_args(project, tmp_path, params, stage)) == 0
        report = json.loads((tmp_path / "metrics" / f"{stage}.json").read_text())
        assert_miou_is_the_mean_iou(report.get("best", report)["test"])
        assert not (tmp_path / "models" / f".{stage}_ckpt").exists()
    live = tmp_path / "live" / "plots" / "metrics" / "train"
    assert (live / "loss_labelled.tsv").is_file()
