"""Smoke tests of stages/warmup.py: its main() on a tiny project (opensam-tiny, 48 px)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import (
    CLASSES,
    SCENE_COLOURS,
    TINY_STORE_ATTRS,
    assert_miou_is_the_mean_iou,
    load_stage,
    write_tiny_project,
)

from opensam.errors import InputError
from opensam.model.segmenter import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def warmup_args(p: dict[str, Path], out: Path) -> list[str]:
    return [
        "--prepared", str(p["prepared"]), "--masks", str(p["masks"]),
        "--data-metrics", str(p["data"]), "--out", str(out / "models" / "teacher.pt"),
        "--metrics", str(out / "metrics" / "warmup.json"), "--live", str(out / "live"),
        "--params", str(p["params"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_project(tmp_path_factory.mktemp("warm"), 4, 2, 2, 4, size=48)


@pytest.fixture(scope="module")
def first_run(project: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run1")
    assert load_stage("warmup").main(warmup_args(project, out)) == 0
    return out


def test_warmup_writes_its_outputs(first_run: Path) -> None:
    metrics = json.loads((first_run / "metrics" / "warmup.json").read_text())
    assert metrics["best_epoch"] in (1, 2)
    for split in ("train", "val", "test"):
        assert_miou_is_the_mean_iou(metrics[split])
        assert set(metrics[split]["iou"]) == set(CLASSES)
    model, meta = load_checkpoint(first_run / "models" / "teacher.pt", expected_classes=CLASSES)
    assert meta["epoch"] == metrics["best_epoch"] and meta["image_size"] == 48
    assert model.num_classes == len(CLASSES)
    # the mask settings of the store it was trained on, and the data set's labelmap colours
    settings = {k: TINY_STORE_ATTRS[k] for k in ("generator", "pps", "min_region_area")}
    assert meta["masks"] == {**settings, "image_size": 48}
    assert meta["labelmap_colors"] == SCENE_COLOURS.tolist()
    for name in ("train/loss", "val/miou"):
        rows = (first_run / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == 3  # header + 2 epochs
    assert not (first_run / "models" / ".warmup_ckpt").exists()
    assert sorted(p.name for p in (first_run / "models").iterdir()) == ["teacher.pt"]


def test_warmup_is_deterministic(project: dict[str, Path], first_run: Path, tmp_path: Path) -> None:
    assert load_stage("warmup").main(warmup_args(project, tmp_path)) == 0
    again = json.loads((tmp_path / "metrics" / "warmup.json").read_text())
    assert again == json.loads((first_run / "metrics" / "warmup.json").read_text())
    a = torch.load(first_run / "models" / "teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "models" / "teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_resumes_after_a_kill(
    project: dict[str, Path], first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = load_stage("warmup")
    real = stage.train_model

    class Killed(Exception):
        pass

    def kill(epoch: int, entry: dict[str, Any]) -> None:
        raise Killed

    monkeypatch.setattr(stage, "train_model", lambda *a, **k: real(*a, **k, on_epoch_end=kill))
    with pytest.raises(Killed):
        stage.main(warmup_args(project, tmp_path))
    assert (tmp_path / "models" / ".warmup_ckpt" / "last.pt").is_file()
    assert not (tmp_path / "models" / "teacher.pt").exists()
    assert load_stage("warmup").main(warmup_args(project, tmp_path)) == 0
    resumed = json.loads((tmp_path / "metrics" / "warmup.json").read_text())
    assert resumed == json.loads((first_run / "metrics" / "warmup.json").read_text())
    rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert rows == (first_run / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()


@pytest.mark.parametrize("change", ["nothing", "pretrained-content", "augment", "drop_path"])
def test_a_checkpoint_of_other_settings_or_inputs_starts_over(
    change: str, project: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Killed after epoch 1, rerun with one thing changed: the rerun starts at epoch 1 again
    (one warning line), except when nothing changed (it resumes at epoch 2)."""
    from opensam.model.clip import create_clip

    def write_weights(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(create_clip("opensam-tiny", None).state_dict(), tmp_path / "clip.pt")

    write_weights(0)
    params = yaml.safe_load(project["params"].read_text())
    params["clip"]["pretrained"] = str(tmp_path / "clip.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = warmup_args({**project, "params": tmp_path / "params.yaml"}, tmp_path)
    stage, ran = load_stage("warmup"), []
    real = stage.train_model

    class Killed(Exception):
        pass

    def kill(epoch: int, entry: dict[str, Any]) -> None:
        ran.append(epoch)
        raise Killed

    monkeypatch.setattr(stage, "train_model", lambda *a, **k: real(*a, **k, on_epoch_end=kill))
    with pytest.raises(Killed):
        stage.main(args)
    if change == "pretrained-content":
        write_weights(1)  # the same file name and params, other weights
    elif change != "nothing":
        params["warmup"][change] = {"augment": not params["warmup"].get("augment", True),
                                    "drop_path": 0.1}[change]  # fmt: skip
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with caplog.at_level("WARNING"), pytest.raises(Killed):
        stage.main(args)
    assert ran == ([1, 2] if change == "nothing" else [1, 1])
    starts_over = [r for r in caplog.records if "starting over" in r.getMessage()]
    assert len(starts_over) == (0 if change == "nothing" else 1)


def test_warmup_missing_masks_is_a_one_line_error(project: dict[str, Path], tmp_path: Path) -> None:
    args = warmup_args(project, tmp_path)
    args[args.index("--masks") + 1] = str(tmp_path / "nope.h5")
    with pytest.raises(InputError, match="nope.h5"):
        load_stage("warmup").main(args)
    assert not (tmp_path / "models" / "teacher.pt").exists()
