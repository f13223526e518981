"""Evaluation: batched inference, confusion matrices, overlays, DVC plot files, the stage main()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    COLORS,
    SIZE,
    StubModel,
    assert_miou_is_the_mean_iou,
    load_stage,
    make_quadrant_project,
    read_png,
    stub_prediction,
    write_params,
    write_tiny_checkpoint,
)

from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError
from opensam.eval.evaluation import (
    PlotCollector,
    build_loader,
    colorize_labels,
    evaluate_ensemble,
    evaluate_model,
    format_eval_table,
    loader_confusions,
    predict_loader,
    render_overlay,
)
from opensam.eval.metrics import miou_report
from opensam.eval.plots import (
    DEFAULT_STRIDE,
    confusion_rows,
    save_confusion_png,
    write_confusion_json,
)
from opensam.model.segmenter import forward_batch

PALETTE = np.array(COLORS, np.uint8)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_quadrant_project(tmp_path_factory.mktemp("proj"))


@pytest.mark.parametrize("use_masks", [True, False])
def test_predict_loader_passes_masks_or_none(project: tuple[Path, Path], use_masks: bool) -> None:
    prepared, masks = project
    model = StubModel()
    ids = ["t0", "t1", "u0"]
    loader = build_loader(model, prepared, ids, None, masks if use_masks else None, 2)
    seen = []
    for batch_ids, log_probs in predict_loader(model, loader, use_masks):
        assert log_probs.shape == (len(batch_ids), len(CLASSES), SIZE, SIZE)
        assert not torch.is_inference_mode_enabled()  # not leaked to the caller between batches
        seen += batch_ids
    assert seen == ids
    assert [none for none, _ in model.calls] == [not use_masks] * 2
    if use_masks:  # padded to the batch's largest mask count, on the model's grid
        assert model.calls[0][1] is not None and model.calls[0][1][0] == 2
        assert model.calls[0][1][2:] == model.grid_hw(SIZE)


def test_evaluate_model_matches_direct_confusion(project: tuple[Path, Path]) -> None:
    prepared, masks = project
    ids = ["t0", "t1", "v0"]
    conf = evaluate_model(StubModel(), prepared, ids, prepared / "labels", masks, 2, True)
    expected = np.zeros((len(CLASSES),) * 2, np.int64)
    pred = stub_prediction()
    for image_id in ids:
        gt = read_png(prepared / "labels" / f"{image_id}.png")
        keep = gt != IGNORE_INDEX
        np.add.at(expected, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    np.testing.assert_array_equal(conf, expected)
    assert conf.sum() == 3 * (SIZE - 1) * SIZE  # the top row is ignored


class TiltedModel(StubModel):
    """Another grid (a DINO beside a CLIP), and a fixed tilt towards class 0 on the left half and
    the last class on the right half: every half disagrees with StubModel's favourite."""

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        return image_size // 8, image_size // 8

    def forward(
        self,
        images: torch.Tensor,
        pool_weights: torch.Tensor | None = None,
        winner: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = super().forward(images, pool_weights, winner)
        w = images.shape[-1]
        tilt = torch.zeros_like(out)
        tilt[:, 0, :, : w // 3] = 6.0  # outvotes the stub on the left third
        tilt[:, -1, :, w // 2 :] = 1.0  # wins alone on the right, not in the mean
        return torch.log_softmax(out + tilt, dim=1)


def test_evaluate_ensemble_is_the_mean_of_the_members_log_probs(
    project: tuple[Path, Path],
) -> None:
    prepared, masks = project
    ids, labels = ["t0", "t1", "v0"], prepared / "labels"
    stub, tilted = StubModel(), TiltedModel()
    conf = evaluate_ensemble([stub, tilted], prepared, ids, labels, masks, 2)
    expected = np.zeros((len(CLASSES),) * 2, np.int64)
    image = torch.zeros(1, 3, SIZE, SIZE)
    mean = (StubModel()(image) + TiltedModel()(image)) / 2
    pred = mean.argmax(dim=1)[0].numpy()
    tilted_alone = TiltedModel()(image).argmax(dim=1)[0].numpy()  # the mean is neither member
    assert not np.array_equal(pred, stub_prediction()) and not np.array_equal(pred, tilted_alone)
    for image_id in ids:
        gt = read_png(labels / f"{image_id}.png")
        keep = gt != IGNORE_INDEX
        np.add.at(expected, (gt[keep].astype(int), pred[keep].astype(int)), 1)
    np.testing.assert_array_equal(conf, expected)
    # each member ran on its own grid, with the masks
    assert stub.calls[0][1] is not None and stub.calls[0][1][2:] == stub.grid_hw(SIZE)
    assert tilted.calls[0][1] is not None and tilted.calls[0][1][2:] == tilted.grid_hw(SIZE)
    alone = evaluate_ensemble([StubModel()], prepared, ids, labels, masks, 2)
    np.testing.assert_array_equal(
        alone, evaluate_model(StubModel(), prepared, ids, labels, masks, 2, True)
    )
    with pytest.raises(ValueError):
        evaluate_ensemble([], prepared, ids, labels, masks, 2)


def test_loader_confusions_restores_the_training_mode(project: tuple[Path, Path]) -> None:
    prepared, masks = project
    model, ids = StubModel().train(), ["t0", "t1", "v0"]
    loader = build_loader(model, prepared, ids, prepared / "labels", masks, 2)
    confs = loader_confusions(model, loader, (True, False))
    assert model.training  # evaluated in eval mode, handed back in training mode
    expected = evaluate_model(StubModel(), prepared, ids, prepared / "labels", masks, 2, True)
    np.testing.assert_array_equal(confs[True], expected)
    assert confs[True].sum() == confs[False].sum()


def test_forward_batch_uses_masks_only_when_asked(project: tuple[Path, Path]) -> None:
    prepared, masks = project
    model = StubModel()
    batch = next(iter(build_loader(model, prepared, ["t0", "t1"], None, masks, 2)))
    out = forward_batch(model, batch, use_masks=False)
    assert out.shape == (2, len(CLASSES), SIZE, SIZE) and out.requires_grad  # autograd kept
    forward_batch(model, batch, use_masks=True)
    assert [none for none, _ in model.calls] == [True, False]


def test_colorize_and_overlay() -> None:
    label = np.array([[0, 1], [IGNORE_INDEX, 3]], np.uint8)
    pred = np.array([[2, 2], [0, 1]], np.uint8)
    image = np.full((2, 2, 3), 7, np.uint8)
    panel = render_overlay(image, label, pred, PALETTE)
    assert panel.shape == (2, 6, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, :2], image)
    np.testing.assert_array_equal(panel[0, 2], COLORS[0])
    np.testing.assert_array_equal(panel[0, 3], COLORS[1])
    np.testing.assert_array_equal(panel[1, 2], [0, 0, 0])  # 255 = black
    np.testing.assert_array_equal(panel[1, 3], COLORS[3])
    np.testing.assert_array_equal(panel[:, 4:], colorize_labels(pred, PALETTE))


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_confusion_rows_strided_grid(stride: int) -> None:
    rng = np.random.default_rng(stride)
    target = rng.integers(0, 4, (16, 16))
    target[::5] = IGNORE_INDEX
    pred = rng.integers(0, 4, (16, 16))
    rows = confusion_rows(pred, target, CLASSES, stride)
    grid = (slice(stride // 2, None, stride),) * 2
    keep = target[grid] != IGNORE_INDEX
    assert len(rows) == int(keep.sum())
    assert rows == [
        {"actual": CLASSES[a], "predicted": CLASSES[b]}
        for a, b in zip(target[grid][keep], pred[grid][keep], strict=True)
    ]


def test_confusion_files(tmp_path: Path) -> None:
    rows = [{"actual": "hand", "predicted": "lizard"}]
    write_confusion_json(tmp_path / "c.json", rows)
    assert json.loads((tmp_path / "c.json").read_text()) == rows
    save_confusion_png(tmp_path / "c.png", np.array([[5, 1], [0, 0]]), ["a", "b"])
    assert read_png(tmp_path / "c.png").ndim == 3


def test_plot_collector_overlays(project: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, masks = project
    plots = PlotCollector(tmp_path, PALETTE, CLASSES, max_overlays=1, stride=4)
    evaluate_model(StubModel(), prepared, ["t0", "t1"], prepared / "labels", masks, 4, True, plots)
    assert [p.name for p in plots.written] == ["t0.png"]
    panel = read_png(tmp_path / "t0.png")
    assert panel.shape == (SIZE, 3 * SIZE, 3)
    np.testing.assert_array_equal(panel[:, :SIZE], read_png(prepared / "images" / "t0.png"))
    gt = read_png(prepared / "labels" / "t0.png")
    np.testing.assert_array_equal(panel[:, SIZE : 2 * SIZE], colorize_labels(gt, PALETTE))
    np.testing.assert_array_equal(panel[0, SIZE], [0, 0, 0])  # ignored top row
    np.testing.assert_array_equal(panel[5, 2 * SIZE], COLORS[1])  # StubModel: left = class 1
    assert len(plots.rows) == 2 * 16 * 16  # 2 images x a 16 x 16 grid from row 2


def test_format_eval_table() -> None:
    with_masks = {"train": {"miou": 12.345}, "test": {"miou": 50.0}}
    results = {"m": {"with_masks": with_masks, "without_masks": {"train": {"miou": None}}}}
    table = format_eval_table(results).splitlines()
    assert table[0].split() == ["model", "masks", "train", "test"]
    assert table[1].split() == ["m", "with_masks", "12.35", "50.00"]
    assert table[2].split() == ["m", "without_masks", "-", "-"]  # no pixels / no split


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(root / "teacher.pt")
    write_tiny_checkpoint(root / "student.pt")
    return root / "teacher.pt", root / "student.pt"


def evaluate_argv(prepared: Path, masks: Path, models: tuple[Path, Path], root: Path) -> list[str]:
    params = write_params(root / "params.yaml", eval={"batch_size": 4, "overlays": 1})
    argv = ["--prepared", str(prepared), "--masks", str(masks)]
    argv += ["--teacher", str(models[0]), "--student", str(models[1])]
    argv += ["--out", str(root / "eval.json"), "--plots", str(root / "eval")]
    return [*argv, "--params", str(params)]


@pytest.mark.slow  # three models x three splits (~10-20 s on 2 busy cores)
def test_evaluate_stage_main(
    project: tuple[Path, Path], models: tuple[Path, Path], tmp_path: Path
) -> None:
    prepared, masks = project
    stage = load_stage("evaluate")
    assert stage.main(evaluate_argv(prepared, masks, models, tmp_path)) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"zeroshot", "teacher", "student"}
    for modes in results.values():
        assert set(modes) == {"with_masks", "without_masks"}
        for per_split in modes.values():
            assert set(per_split) == {"train", "val", "test"}
            for report in per_split.values():
                assert set(report) == {"miou", "iou"} and set(report["iou"]) == set(CLASSES)
                assert_miou_is_the_mean_iou(report)
    # one shared embedding per batch gives the numbers of separate single-mode evaluations
    from opensam.model.segmenter import load_checkpoint

    student, _ = load_checkpoint(models[1])
    for mode, use_masks in (("with_masks", True), ("without_masks", False)):
        conf = evaluate_model(
            student, prepared, ["t0", "t1"], prepared / "labels", masks, 4, use_masks
        )
        assert results["student"][mode]["test"] == miou_report(conf, CLASSES)
    overlays = sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["t0.png"]  # eval.overlays = 1
    assert read_png(overlays[0]).shape == (SIZE, 3 * SIZE, 3)
    rows = json.loads((tmp_path / "eval" / "confusion.json").read_text())
    per_side = len(range(DEFAULT_STRIDE // 2, SIZE, DEFAULT_STRIDE))
    assert len(rows) == 2 * per_side**2  # the strided grid of both test images, none ignored
    assert {r["actual"] for r in rows} <= set(CLASSES)


def test_evaluate_stage_missing_student(
    project: tuple[Path, Path], models: tuple[Path, Path], tmp_path: Path
) -> None:
    prepared, masks = project
    argv = evaluate_argv(prepared, masks, (models[0], tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(InputError, match="nope.pt"):
        load_stage("evaluate").main(argv)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "eval").exists()
