"""Pseudo-label generation, its quality against hidden ground truth, and the pseudolabel stage.

The quadrant project and ``StubModel`` are in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    LEFT_P,
    RIGHT_P,
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
from opensam.train.pseudo_format import (
    CONFIDENCE_DIR,
    IDS_FILE,
    LABELS_DIR,
    hard_labels,
    load_pseudo_ids,
)
from opensam.train.pseudo_labels import generate_pseudo_labels, measure_pseudo_quality


def direct_miou(preds: list[np.ndarray], gts: list[np.ndarray]) -> float:
    """mIoU (percent) by set counting, over classes present in GT or prediction; 255 skipped."""
    pred, gt = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    keep = (gt != IGNORE_INDEX) & (pred != IGNORE_INDEX)
    pred, gt = pred[keep], gt[keep]
    ious = []
    for c in range(len(CLASSES)):
        union = np.sum((pred == c) | (gt == c))
        if union:
            ious.append(np.sum((pred == c) & (gt == c)) / union)
    return 100.0 * float(np.mean(ious))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_quadrant_project(tmp_path_factory.mktemp("proj"))


def test_hard_labels_threshold_and_confidence() -> None:
    # two pixels: max 0.7 (class 0) and max 0.4 (class 2)
    probs = torch.tensor([[0.7, 0.3], [0.1, 0.3], [0.2, 0.4], [0.0, 0.0]]).view(1, 4, 1, 2)
    labels, conf = hard_labels(probs.clamp_min(1e-9).log(), 0.5)
    assert labels.dtype == torch.uint8
    assert labels.flatten().tolist() == [0, IGNORE_INDEX]
    assert conf.flatten().tolist() == pytest.approx([0.7, 0.4], abs=1e-6)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_generate_writes_files_and_thresholds(
    project: tuple[Path, Path], tmp_path: Path, threshold: float | None
) -> None:
    prepared, masks = project
    ids = ["u0", "u1", "u2"]
    model = StubModel()
    summary = generate_pseudo_labels(model, prepared, ids, masks, tmp_path, threshold, 2)
    assert json.loads((tmp_path / IDS_FILE).read_text()) == ids
    assert all(not none for none, _ in model.calls)  # masks were used
    expected = stub_prediction()
    if threshold is not None:
        expected[:, SIZE // 2 :] = IGNORE_INDEX  # RIGHT_P = 0.4 < 0.5
    for image_id in ids:
        label = read_png(tmp_path / LABELS_DIR / f"{image_id}.png")
        conf = read_png(tmp_path / CONFIDENCE_DIR / f"{image_id}.png")
        assert label.dtype == np.uint8 and label.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(label, expected)
        assert conf[0, 0] == round(255 * LEFT_P) and conf[0, -1] == round(255 * RIGHT_P)
    assert summary["images"] == 3
    assert summary["mean_confidence"] == pytest.approx((LEFT_P + RIGHT_P) / 2, abs=1e-4)
    assert summary["ignored_fraction"] == (0.5 if threshold else 0.0)
    gts = [read_png(prepared / "unlabelled_gt" / f"{i}.png") for i in ids]
    miou = summary["vs_hidden_gt"]["miou"]
    assert miou == pytest.approx(direct_miou([expected] * 3, gts), abs=0.006)
    assert set(summary["vs_hidden_gt"]["iou"]) == set(CLASSES)
    assert load_pseudo_ids(tmp_path) == ids


def test_measure_quality_none_without_gt_and_errors(
    project: tuple[Path, Path], tmp_path: Path
) -> None:
    prepared, masks = project
    generate_pseudo_labels(StubModel(), prepared, ["t0"], masks, tmp_path, None, 4)
    assert measure_pseudo_quality(tmp_path, prepared, ["t0"], CLASSES) is None
    (tmp_path / LABELS_DIR / "t0.png").unlink()
    with pytest.raises(InputError, match="ids.json"):
        load_pseudo_ids(tmp_path)


def test_generate_without_masks_passes_none(project: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, _ = project
    model = StubModel()
    summary = generate_pseudo_labels(model, prepared, ["u0"], None, tmp_path, None, 4, False)
    assert model.calls and all(none for none, _ in model.calls)
    assert summary["images"] == 1


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "teacher.pt"
    write_tiny_checkpoint(path)
    return path


def run_pseudolabel(root: Path, prepared: Path, masks: Path, teacher: Path, ratio: int) -> Path:
    pseudolabel = load_stage("pseudolabel")
    # an untrained teacher is confident nowhere: no threshold, so every pixel is measured
    pseudo = {"conf_threshold": None, "batch_size": 16}
    params = write_params(root / f"params{ratio}.yaml", ratio=ratio, pseudo=pseudo)
    out, metrics = root / f"pseudo{ratio}", root / f"pseudo{ratio}.json"
    argv = ["--prepared", str(prepared), "--masks", str(masks), "--teacher", str(teacher)]
    argv += ["--out", str(out), "--metrics", str(metrics), "--params", str(params)]
    assert pseudolabel.main(argv) == 0
    return out


def test_pseudolabel_stage_ratio_nesting(
    project: tuple[Path, Path], teacher: Path, tmp_path: Path
) -> None:
    prepared, masks = project
    one = run_pseudolabel(tmp_path, prepared, masks, teacher, 1)
    two = run_pseudolabel(tmp_path, prepared, masks, teacher, 2)
    ids1, ids2 = load_pseudo_ids(one), load_pseudo_ids(two)
    assert len(ids1) == 2 and len(ids2) == 4  # ratio x len(train), train = 2
    assert set(ids1) < set(ids2)
    assert sorted(p.stem for p in (two / LABELS_DIR).glob("*.png")) == sorted(ids2)
    metrics = json.loads((tmp_path / "pseudo2.json").read_text())
    assert metrics["images"] == 4
    assert_miou_is_the_mean_iou(metrics["vs_hidden_gt"])
    assert metrics["vs_hidden_gt"] == measure_pseudo_quality(two, prepared, ids2, CLASSES)
    assert not list(tmp_path.glob(".*.tmp"))


def test_pseudolabel_stage_bad_teacher(project: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, masks = project
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="teacher.pt"):
        run_pseudolabel(tmp_path, prepared, masks, bad, 1)
    assert not (tmp_path / "pseudo1").exists() and not (tmp_path / "pseudo1.json").exists()
