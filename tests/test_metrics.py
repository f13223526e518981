"""The one mIoU: confusion matrix, IoU conventions, and agreement with torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from opensam.constants import IGNORE_INDEX
from opensam.eval.metrics import (
    confusion_matrix,
    format_miou_table,
    iou_from_confusion,
    miou_from_confusion,
    miou_report,
)


def test_confusion_matrix_counts_rows_gt_cols_pred_and_skips_ignore() -> None:
    target = np.array([[0, 0, 1], [2, IGNORE_INDEX, 1]])
    pred = np.array([[0, 1, 1], [0, 2, 1]])
    conf = confusion_matrix(pred, target, 3)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert conf.dtype == np.int64
    assert np.array_equal(conf, expected)
    assert np.array_equal(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 3), expected
    )


def test_iou_nan_for_absent_classes_and_miou_over_present_ones() -> None:
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent from GT and prediction
    iou = iou_from_confusion(conf)
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == pytest.approx(2 / 3)
    assert math.isnan(iou[2])
    assert miou_from_confusion(conf) == pytest.approx((3 / 4 + 2 / 3) / 2)
    only_predicted = np.array([[0, 2], [0, 0]])  # class 1 predicted but never in GT: IoU 0
    assert iou_from_confusion(only_predicted).tolist() == [0.0, 0.0]
    assert math.isnan(miou_from_confusion(np.zeros((2, 2), np.int64)))


def test_bad_values_raise() -> None:
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 1]), 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics_jaccard(seed: int) -> None:
    """torchmetrics with average=None gives per-class IoU (0 where the union is empty); we
    compare classes with a non-empty union, and mIoU = their mean (our nanmean)."""
    gen = np.random.default_rng(seed)
    c = 5
    target = gen.integers(0, c - 1, size=(3, 17, 19))  # class 4 never in the ground truth
    pred = gen.integers(0, c - 2, size=target.shape)  # class 3 and 4 never predicted
    target[gen.random(target.shape) < 0.1] = IGNORE_INDEX
    pred[target == 2] = 0  # class 2 in GT but never predicted correctly: IoU 0
    metric = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=IGNORE_INDEX)
    ref = metric(torch.from_numpy(pred), torch.from_numpy(target)).double().numpy()
    iou = iou_from_confusion(confusion_matrix(pred, target, c))
    present = ~np.isnan(iou)
    assert present.tolist() == [True, True, True, True, False]
    assert np.allclose(iou[present], ref[present])
    assert iou[2] == 0.0
    conf = confusion_matrix(pred, target, c)
    assert miou_from_confusion(conf) == pytest.approx(ref[present].mean())


def test_miou_report_percent_and_none() -> None:
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    report = miou_report(conf, ["a", "b", "c"])
    assert report == {"miou": 70.83, "iou": {"a": 75.0, "b": 66.67, "c": None}}
    with pytest.raises(ValueError):
        miou_report(conf, ["a", "b"])


def test_format_miou_table_rows_and_reference() -> None:
    table = format_miou_table(
        {"x": {"p1": 12.346}, "y": {"p2": 50.0}},
        ["p1", "p2"],
        ["mIoU", "one", "two"],
        row_names={"x": "Row X"},
        reference={"x": {"p2": 99.0}},
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| mIoU | one | two |"
    assert lines[2] == "| Row X | 12.35 |  |"
    assert lines[3] == "| *thesis* |  | 99.00 |"
    assert lines[4] == "| y |  | 50.00 |"
