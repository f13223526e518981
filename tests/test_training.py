"""The training loop: schedule, ramp, loss, class weights, determinism, kill-and-resume, DVCLive."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_project
from PIL import Image
from torch import nn

from opensam.config import StudentParams, TrainParams
from opensam.constants import IGNORE_INDEX
from opensam.data.augment import Augmenter
from opensam.data.datasets import make_train_loaders
from opensam.errors import InputError
from opensam.train.engine import TrainConfig, TrainResult
from opensam.train.losses import (
    alpha_ramp,
    class_weights_from_fractions,
    cosine_lr,
    resolve_class_weights,
    segmentation_loss,
)
from opensam.train.reporting import open_live
from opensam.train.supervised import train_model

GRID = (2, 2)


class ToyModel(nn.Module):
    """OpenSamModel's interface (log-probs from images [+ masks]) with dropout, for fast loops."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(8, classes, 1)

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        return GRID

    def forward(
        self, images: torch.Tensor, pool_weights: Any = None, winner: Any = None
    ) -> torch.Tensor:
        return F.log_softmax(self.head(self.drop(torch.relu(self.conv(images)))), dim=1)


def toy(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    paths = write_tiny_project(tmp_path_factory.mktemp("train"), 6, 3, 1, 10, size=32)
    splits = json.loads(paths["splits"].read_text())
    # the hidden ground truth stands in for pseudo-labels
    pseudo = paths["prepared"].parent / "pseudo"
    pseudo.mkdir()
    (pseudo / "labels").symlink_to(paths["prepared"] / "unlabelled_gt")
    return {**paths, "split": splits, "pseudo": pseudo}


def loaders(project: dict[str, Any], pseudo: bool = False, seed: int = 0) -> tuple[Any, Any, Any]:
    pool = (project["split"]["unlabelled"], project["pseudo"]) if pseudo else None
    return make_train_loaders(
        project["prepared"], project["split"]["train"], project["split"]["val"], None, GRID,
        batch_size=4, seed=seed, augment=Augmenter(), pseudo=pool,
    )  # fmt: skip


CFG = TrainConfig(epochs=4, lr_max=0.02, lr_min=0.001, weight_decay=1e-4, batch_size=4,
                  class_weights=(0.3, 0.3, 0.2, 0.2), use_masks=False, alpha_f=0.5,
                  seed=3)  # fmt: skip


def run(
    project: dict[str, Any], cfg: TrainConfig = CFG, pseudo: bool = True, **kw: Any
) -> TrainResult:
    train, pool, val = loaders(project, pseudo)
    return train_model(toy(), train, cfg, val_loader=val, pseudo_loader=pool, **kw)


def assert_same_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1.0), (100, 0.1), (50, 0.55), (25, 0.1 + 0.45 * (1 + math.sqrt(0.5)))],
)
def test_cosine_lr(step: int, expected: float) -> None:
    assert cosine_lr(step, 100, 1.0, 0.1) == pytest.approx(expected)


def test_cosine_lr_decreases() -> None:
    lrs = [cosine_lr(t, 37, 3e-7, 1e-8) for t in range(38)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (19, 0.0), (20, 0.0), (50, 1.0), (35, 0.5), (80, 2.0), (99, 2.0), (100, 2.0)],
)
def test_alpha_ramp(step: int, expected: float) -> None:
    assert alpha_ramp(step, 100, 2.0, 0.2, 0.8) == pytest.approx(expected)


def test_alpha_ramp_step_when_t1_equals_t2() -> None:
    assert alpha_ramp(29, 100, 1.5, 0.3, 0.3) == 0.0
    assert alpha_ramp(30, 100, 1.5, 0.3, 0.3) == 1.5


def test_class_weights_inverse_frequency() -> None:
    w = class_weights_from_fractions({"a": 10.0, "b": 20.0, "c": 70.0}, ["c", "a", "b"])
    assert sum(w) == pytest.approx(1.0)
    assert w[1] == pytest.approx(2 * w[2]) and w[1] == pytest.approx(7 * w[0])


def test_class_weights_zero_and_missing() -> None:
    w = class_weights_from_fractions({"a": 50.0, "b": 0.0, "c": 50.0}, ["a", "b", "c"])
    assert w[1] == pytest.approx(w[0]) and sum(w) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="z"):
        class_weights_from_fractions({"a": 1.0}, ["a", "z"])


def test_resolve_class_weights(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"train": {"class_fractions": {"x": 25.0, "y": 75.0}}}))
    assert resolve_class_weights("auto", ["x", "y"], data) == pytest.approx([0.75, 0.25])
    assert resolve_class_weights((0.4, 0.6), ["x", "y"], data) == [0.4, 0.6]
    with pytest.raises(InputError, match="2 classes"):
        resolve_class_weights((1.0,), ["x", "y"], data)
    with pytest.raises(InputError, match="missing.json"):
        resolve_class_weights("auto", ["x", "y"], tmp_path / "missing.json")
    with pytest.raises(InputError, match="data.json"):
        resolve_class_weights("auto", ["x", "q"], data)


def test_auto_class_weights_count_only_the_labels_a_run_has(tmp_path: Path) -> None:
    """labelled_train cuts the train split: ``auto`` weights come from the kept labels alone,
    never from the split's shares in data.json (which include labels the run does not have)."""
    labels = []
    for i, x_pixels in enumerate((4, 12, 8)):  # class x's pixels in each 4 x 4 label; y the rest
        label = np.ones((4, 4), np.uint8)
        label.flat[:x_pixels] = 0
        label[3, 3] = 255  # ignored pixels count for no class
        labels.append(tmp_path / f"{i}.png")
        Image.fromarray(label).save(labels[-1])
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"train": {"images": 3, "class_fractions": {"x": 50, "y": 50}}}))
    # the whole split: the prepare stage's count (here made up, to tell the two apart)
    assert resolve_class_weights("auto", ["x", "y"], data, labels) == pytest.approx([0.5, 0.5])
    # the first two: x has 16 of 30 pixels (4 + 12; 15 counted per label)
    weights = resolve_class_weights("auto", ["x", "y"], data, labels[:2])
    fractions = {"x": round(100 * 16 / 30, 2), "y": round(100 * 14 / 30, 2)}
    assert weights == pytest.approx(class_weights_from_fractions(fractions, ["x", "y"]))
    assert weights[0] < weights[1]  # x is the commoner class there


def test_segmentation_loss_matches_manual_weighted_nll() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = F.log_softmax(torch.randn(2, 3, 4, 5, generator=gen), 1)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    target[0, 0] = IGNORE_INDEX
    weight = torch.tensor([0.2, 0.5, 0.3])
    valid = target != IGNORE_INDEX
    t = target[valid]
    picked = logp.permute(0, 2, 3, 1)[valid].gather(1, t[:, None])[:, 0]
    manual = -(weight[t] * picked).sum() / weight[t].sum()
    assert segmentation_loss(logp, target, weight) == pytest.approx(float(manual), rel=1e-6)


def test_segmentation_loss_all_ignored_is_zero_with_grad() -> None:
    logp = torch.zeros(1, 2, 3, 3, requires_grad=True)
    loss = segmentation_loss(logp, torch.full((1, 3, 3), IGNORE_INDEX), None)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logp.grad is not None


def test_config_from_params() -> None:
    warm = TrainConfig.from_params(TrainParams(epochs=3, betas=(0.8, 0.9)), [0.5, 0.5], seed=4)
    assert (warm.epochs, warm.betas, warm.alpha_f, warm.seed) == (3, (0.8, 0.9), 0.0, 4)
    student = TrainConfig.from_params(StudentParams(alpha_f=2.0, t1=0.1, t2=0.5), None, seed=0)
    assert (student.alpha_f, student.t1, student.t2, student.class_weights) == (2.0, 0.1, 0.5, None)
    with pytest.raises(ValueError):
        TrainConfig.from_params(TrainParams(lr_min=1.0, lr_max=0.1), None, seed=0)


def test_training_learns_and_follows_the_schedule(project: dict[str, Any]) -> None:
    result = run(project)
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["train/loss_labelled"] < hist[0]["train/loss_labelled"]
    assert hist[0]["train/loss_pseudo"] is None  # α = 0 over the first 20 % of steps
    assert hist[-1]["train/loss"] > hist[-1]["train/loss_labelled"]
    # 10 pseudo images, batch 4 → 3 steps per epoch (the labelled loader cycles)
    assert hist[-1]["lr"] == pytest.approx(cosine_lr(12, 12, CFG.lr_max, CFG.lr_min))
    assert hist[0]["lr"] == pytest.approx(cosine_lr(3, 12, CFG.lr_max, CFG.lr_min))
    assert hist[-1]["alpha"] == pytest.approx(CFG.alpha_f)
    best = max(range(4), key=lambda i: (hist[i]["val/miou"], -i))
    assert result.best_epoch == best + 1
    assert result.best_miou == hist[best]["val/miou"]


def test_same_seed_same_weights(project: dict[str, Any]) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    a, b = run(project, cfg), run(project, cfg)
    assert_same_states(a.last_state, b.last_state)
    assert a.history == b.history
    c = run(project, TrainConfig(**{**cfg.__dict__, "seed": 4}))
    assert not torch.equal(a.last_state["head.weight"], c.last_state["head.weight"])


class Killed(Exception):
    pass


def kill_after(epoch: int) -> Any:
    def callback(e: int, entry: dict[str, Any]) -> None:
        if e == epoch:
            raise Killed

    return callback


def test_kill_and_resume_gives_the_same_result(project: dict[str, Any], tmp_path: Path) -> None:
    ref = run(project)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        run(project, checkpoint_dir=ckpt, on_epoch_end=kill_after(2))
    assert (ckpt / "last.pt").is_file()
    torch.manual_seed(12345)  # a restarted process has other RNG states
    resumed = run(project, checkpoint_dir=ckpt)
    assert_same_states(ref.last_state, resumed.last_state)
    assert_same_states(ref.best_state, resumed.best_state)
    assert ref.history == resumed.history and ref.best_epoch == resumed.best_epoch


def test_checkpoint_of_another_config_is_ignored(project: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1})
    run(project, cfg, checkpoint_dir=tmp_path)
    other = TrainConfig(**{**cfg.__dict__, "lr_max": 0.01})
    fresh, restarted = run(project, other), run(project, other, checkpoint_dir=tmp_path)
    assert_same_states(fresh.last_state, restarted.last_state)


def _damage(state: dict[str, Any], how: str) -> None:
    weights = state["models"]["model"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    if how == "nan-weight":
        weights[key] = torch.full_like(weights[key], float("nan"))
    elif how == "wrong-shape":
        weights[key] = torch.zeros(3, 1, 2)
    elif how == "optimizer-shape":
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)
    elif how == "bad-rng":
        state["rng"]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)
    else:
        state["epoch"] = 99


@pytest.mark.parametrize(
    "how", ["nan-weight", "wrong-shape", "optimizer-shape", "bad-rng", "epoch"]
)
def test_a_damaged_resume_checkpoint_starts_over(
    how: str, project: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint of the same run whose weights, optimizer moments, RNG states or epoch are
    bad is never (half-)loaded: the run starts over, with one warning."""
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    with pytest.raises(Killed):
        run(project, cfg, checkpoint_dir=tmp_path, on_epoch_end=kill_after(1))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    _damage(state, how)
    torch.save(state, tmp_path / "last.pt")
    with caplog.at_level("WARNING"):
        restarted = run(project, cfg, checkpoint_dir=tmp_path)
    assert "unusable checkpoint" in caplog.text
    assert_same_states(run(project, cfg).last_state, restarted.last_state)


def test_a_checkpoint_of_the_old_format_starts_over(
    project: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``last.pt`` of format 1 (the separate offline and online loops) is never resumed: the
    run starts over with one warning that names the format."""
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    with pytest.raises(Killed):
        run(project, cfg, checkpoint_dir=tmp_path, on_epoch_end=kill_after(1))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("models", "method")}
    old |= {"format": 1, "model": state["models"]["model"]}  # the old offline layout
    torch.save(old, tmp_path / "last.pt")
    with caplog.at_level("WARNING"):
        restarted = run(project, cfg, checkpoint_dir=tmp_path)
    assert "checkpoint format 1" in caplog.text and "resumed from" not in caplog.text
    assert_same_states(run(project, cfg).last_state, restarted.last_state)


def test_ties_keep_the_earlier_epoch(project: dict[str, Any]) -> None:
    frozen = TrainConfig(**{**CFG.__dict__, "lr_max": 1e-30, "lr_min": 0.0, "epochs": 3})
    result = run(project, frozen, pseudo=False)
    assert len({h["val/miou"] for h in result.history}) == 1
    assert result.best_epoch == 1


def test_model_left_with_best_weights(project: dict[str, Any]) -> None:
    train, _, val = loaders(project)
    model = toy()
    result = train_model(model, train, CFG, val_loader=val)
    assert_same_states({k: v for k, v in model.state_dict().items()}, result.best_state)


def test_live_curves_layout_and_resume_replay(project: dict[str, Any], tmp_path: Path) -> None:
    live_dir, ckpt = tmp_path / "live", tmp_path / "ckpt"
    with pytest.raises(Killed):
        run(project, checkpoint_dir=ckpt, live=open_live(live_dir), on_epoch_end=kill_after(3))
    live = open_live(live_dir)
    run(project, checkpoint_dir=ckpt, live=live)
    live.end()
    for name in ("train/loss", "val/miou", "train/miou"):
        rows = (live_dir / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["step", name.split("/")[1]]
        assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3"]


def test_run_key_covers_params_and_input_contents(tmp_path: Path) -> None:
    from opensam.train.resume import run_key

    (tmp_path / "prepared" / "images").mkdir(parents=True)
    (tmp_path / "prepared" / "images" / "a.png").write_bytes(b"a")
    (tmp_path / "w.pt").write_bytes(b"weights")
    inputs = {"prepared": tmp_path / "prepared", "weights": tmp_path / "w.pt", "none": None}
    key = run_key({"warmup": CFG, "seed": 0}, inputs)
    assert run_key({"warmup": CFG, "seed": 0}, inputs) == key  # stable
    (tmp_path / "prepared" / ".cache").write_bytes(b"hidden files do not count")
    assert run_key({"warmup": CFG, "seed": 0}, inputs) == key
    assert run_key({"warmup": CFG, "seed": 1}, inputs) != key
    (tmp_path / "w.pt").write_bytes(b"other weights")
    assert run_key({"warmup": CFG, "seed": 0}, inputs) != key
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "prepared" / "images" / "a.png").write_bytes(b"b")
    assert run_key({"warmup": CFG, "seed": 0}, inputs) != key
