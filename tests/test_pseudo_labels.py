"""Pseudo-label generation, its quality against hidden ground truth, and the pseudolabel stage.

The tiny-project helpers here (``make_project``, ``StubModel``, ``write_tiny_checkpoint``) are
also used by tests/test_evaluation.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from opensam.config import ClipParams
from opensam.constants import IGNORE_INDEX
from opensam.errors import InputError
from opensam.masks.arrays import MaskSet, boxes_xywh
from opensam.masks.store import MaskStoreWriter
from opensam.train.pseudo_labels import (
    CONFIDENCE_DIR,
    IDS_FILE,
    LABELS_DIR,
    generate_pseudo_labels,
    hard_labels,
    load_pseudo_ids,
    measure_pseudo_quality,
    select_pool_ids,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["lizard", "hand", "color board", "background"]
COLORS = [[250, 220, 40], [40, 200, 60], [40, 90, 230], [150, 60, 190]]
SIZE = 64
# StubModel: left half class 1 with p = 0.8, right half class 2 with p = 0.4 (255p is whole)
LEFT, LEFT_P, RIGHT, RIGHT_P = 1, 0.8, 2, 0.4


def quadrant_masks(n: int) -> MaskSet:
    """The first ``n`` quadrants of a SIZE x SIZE image as masks (equal areas, so sorted)."""
    half = SIZE // 2
    masks = np.zeros((n, SIZE, SIZE), bool)
    for q in range(n):
        r, c = divmod(q, 2)
        masks[q, r * half : (r + 1) * half, c * half : (c + 1) * half] = True
    return MaskSet(
        masks=masks,
        area=masks.sum((1, 2)).astype(np.int32),
        predicted_iou=np.ones(n, np.float32),
        stability_score=np.ones(n, np.float32),
        bbox=boxes_xywh(masks),
    )


def random_label(rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE) uint8: a random class per quadrant and an ignored (255) top row."""
    half = SIZE // 2
    label = np.kron(rng.integers(0, len(CLASSES), (2, 2)), np.ones((half, half))).astype(np.uint8)
    label[0] = IGNORE_INDEX
    return label


def make_project(
    root: Path, n_train: int = 2, n_val: int = 1, n_test: int = 2, n_unl: int = 6
) -> tuple[Path, Path]:
    """A prepared-data folder and a mask store under ``root``; returns (prepared, masks.h5).

    Unlabelled images have hidden ground truth; image ``u1`` has no masks (n = 0).
    """
    rng = np.random.default_rng(0)
    prepared = root / "prepared"
    for sub in ("images", "labels", "unlabelled_gt"):
        (prepared / sub).mkdir(parents=True)
    splits: dict = {"image_size": SIZE, "classes": CLASSES, "colors": COLORS}
    counts = {"train": n_train, "val": n_val, "test": n_test, "unlabelled": n_unl}
    for split, n in counts.items():
        splits[split] = [f"{split[0]}{i}" for i in range(n)]
        for image_id in splits[split]:
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(prepared / "images" / f"{image_id}.png")
            sub = "unlabelled_gt" if split == "unlabelled" else "labels"
            Image.fromarray(random_label(rng)).save(prepared / sub / f"{image_id}.png")
    splits["unlabelled_gt"] = True
    (prepared / "splits.json").write_text(json.dumps(splits))
    masks = root / "masks.h5"
    attrs = {"generator": "superpixels", "model": "", "checkpoint_sha256": "", "pps": 2}
    attrs |= {"min_region_area": 0, "image_size": SIZE}
    ids = [i for split in counts for i in splits[split]]
    with MaskStoreWriter(masks, attrs, ids) as writer:
        for k, image_id in enumerate(ids):
            writer.write(image_id, quadrant_masks(0 if image_id == "u1" else 1 + k % 4))
    return prepared, masks


class StubModel(nn.Module):
    """A model with known output: left half class LEFT (p = LEFT_P), right half RIGHT (RIGHT_P).

    Records for every call whether pool_weights was None, and the pool_weights shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[bool, tuple[int, ...] | None]] = []

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        return image_size // 16, image_size // 16

    def forward(
        self,
        images: torch.Tensor,
        pool_weights: torch.Tensor | None = None,
        winner: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.calls.append(
            (pool_weights is None, None if pool_weights is None else pool_weights.shape)
        )
        b, _, h, w = images.shape
        probs = torch.empty(b, len(CLASSES), h, w)
        left, right = slice(0, w // 2), slice(w // 2, w)
        probs[..., left] = (1 - LEFT_P) / (len(CLASSES) - 1)
        probs[:, LEFT, :, left] = LEFT_P
        probs[..., right] = (1 - RIGHT_P) / (len(CLASSES) - 1)
        probs[:, RIGHT, :, right] = RIGHT_P
        return probs.log() + self.weight


def stub_prediction() -> np.ndarray:
    """The StubModel's hard labels (SIZE, SIZE)."""
    pred = np.full((SIZE, SIZE), LEFT, np.uint8)
    pred[:, SIZE // 2 :] = RIGHT
    return pred


def write_tiny_checkpoint(path: Path) -> None:
    """An untrained opensam-tiny model saved with save_checkpoint."""
    from opensam.model.segmenter import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ClipParams(), [f"a {c}" for c in CLASSES])
    save_checkpoint(path, model, CLASSES, ClipParams(), SIZE)


def load_stage(name: str) -> ModuleType:
    """Import ``stages/<name>.py`` as a module (stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_params(path: Path, **over: object) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(image_size=SIZE, **over)
    raw["clip"] = {"model": "opensam-tiny", "pretrained": None}  # offline, whatever the preset
    pairs = zip(CLASSES, COLORS, strict=True)
    raw["classes"] = [{"name": n, "prompt": f"a {n}", "color": c} for n, c in pairs]
    path.write_text(yaml.safe_dump(raw))
    return path


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
    return make_project(tmp_path_factory.mktemp("proj"))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_select_pool_ids_nests_and_clips() -> None:
    pool = [f"u{i}" for i in range(10)]
    one, two = select_pool_ids(pool, 3, 1), select_pool_ids(pool, 3, 2)
    assert one == pool[:3] and two == pool[:6]
    assert set(one) < set(two)
    assert select_pool_ids(pool, 3, 8) == pool  # fewer than wanted: all of them
    assert select_pool_ids(pool, 3, 0) == []


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
    params = write_params(root / f"params{ratio}.yaml", ratio=ratio)
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
    assert metrics["images"] == 4 and 0.0 <= metrics["vs_hidden_gt"]["miou"] <= 100.0
    assert not list(tmp_path.glob(".*.tmp"))


def test_pseudolabel_stage_bad_teacher(project: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, masks = project
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="teacher.pt"):
        run_pseudolabel(tmp_path, prepared, masks, bad, 1)
    assert not (tmp_path / "pseudo1").exists() and not (tmp_path / "pseudo1.json").exists()
