"""Shared test helpers and fixtures: tiny prepared projects, stub models, stage loading.

Test modules import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``); no test module imports another test module.

Two tiny prepared projects (layout: :mod:`opensam.prepared`):

- :func:`write_tiny_project`: synthetic scenes (board, hand, lizard on paper) with region masks
  per class, ``metrics/data.json`` and a tiny ``params.yaml``; for training and stage tests.
- :func:`make_quadrant_project`: random pixels, random class per quadrant and quadrant masks; with
  :class:`StubModel` (known output), for pseudo-label and evaluation tests.

Params files start from the repository's ``params.yaml`` but pin what the tests rely on (the demo
classes, the offline opensam-tiny CLIP, the superpixel generator), so that a user who edits
``params.yaml`` for their own data (README "Using your own data") does not break the tests.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from opensam.config import ClipParams
from opensam.constants import IGNORE_INDEX
from opensam.masks.arrays import MaskSet, boxes_xywh
from opensam.masks.store import MaskStoreWriter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["lizard", "hand", "color board", "background"]
PROMPTS = ["a lizard", "a human hand", "a color board", "a background"]
COLORS = [[250, 220, 40], [40, 200, 60], [40, 90, 230], [150, 60, 190]]  # labelmap / overlay
CLASS_SPECS = [
    {"name": n, "prompt": p, "color": c} for n, p, c in zip(CLASSES, PROMPTS, COLORS, strict=True)
]
SIZE = 64


# --- stages and params ---------------------------------------------------------------------------


def load_stage(name: str) -> ModuleType:
    """Import ``stages/<name>.py`` as a fresh module (stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def repo_params(**over: Any) -> dict[str, Any]:
    """The repository's params.yaml as a mapping, with the demo classes, the offline tiny CLIP and
    the superpixel generator pinned, then ``over`` applied (top-level keys)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["classes"] = [dict(c) for c in CLASS_SPECS]
    raw["clip"] = {"model": "opensam-tiny", "pretrained": None}
    raw["masks"] = {**raw.get("masks", {}), "generator": "superpixels"}
    raw.update(over)
    return raw


def write_params(path: Path, **over: Any) -> Path:
    """:func:`repo_params` at ``image_size`` SIZE (plus ``over``) written to ``path``."""
    path.write_text(yaml.safe_dump(repo_params(image_size=SIZE, **over)))
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread (also for stages, which call seed_everything and read OPENSAM_THREADS):
    two OpenMP threads on a busy 2-core machine spin against each other. Use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSAM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# --- the scene project (training and stage tests) ------------------------------------------------

SCENE_COLOURS = np.array([[60, 170, 60], [225, 180, 150], [40, 60, 200], [235, 235, 225]], np.uint8)


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (H, W, 3) uint8 photo and its (H, W) uint8 label: board, hand, lizard on paper."""
    label = np.full((size, size), 3, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for c, radius in ((2, 0.22), (1, 0.18), (0, 0.14)):
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        r = radius * size
        label[
            (np.abs(yy - cy) < r) & (np.abs(xx - cx) < 1.4 * r)
            if c == 2
            else (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        ] = c
    y, x = rng.integers(0, size - 4, 2)
    label[y : y + 3, x : x + 3] = IGNORE_INDEX  # a paper scrap
    image = SCENE_COLOURS[np.minimum(label, 3)].astype(np.float64)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def region_masks(label: np.ndarray) -> MaskSet:
    """Masks = each class's region plus the background's quadrants, sorted largest first."""
    h, w = label.shape
    masks = [label == c for c in range(4) if (label == c).any()]
    bg = label == 3
    for qy in (slice(0, h // 2), slice(h // 2, h)):
        for qx in (slice(0, w // 2), slice(w // 2, w)):
            q = np.zeros_like(bg)
            q[qy, qx] = bg[qy, qx]
            masks.append(q)
    stack = np.stack([m for m in masks if m.any()])
    area = stack.reshape(len(stack), -1).sum(1)
    order = np.argsort(-area, kind="stable")
    stack = stack[order]
    n = len(stack)
    return MaskSet(
        stack,
        area[order].astype(np.int32),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        boxes_xywh(stack),
    )


TINY_STORE_ATTRS = {
    "generator": "test",
    "model": "none",
    "checkpoint_sha256": "",
    "pps": 4,
    "min_region_area": 0,
}


def write_tiny_project(
    root: Path,
    n_train: int = 6,
    n_val: int = 3,
    n_test: int = 2,
    n_unlab: int = 6,
    size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """prepared/ (images, labels, unlabelled_gt, splits.json), masks.h5 (generator ``test``, pps 4,
    area 0), metrics/data.json and a tiny params.yaml (opensam-tiny, ``size`` px, ratio 1, 2
    warm-up epochs, 2 student rounds of 1 epoch). splits.json's labelmap colours are
    SCENE_COLOURS."""
    rng = np.random.default_rng(seed)
    prepared = root / "prepared"
    for sub in ("images", "labels", "unlabelled_gt"):
        (prepared / sub).mkdir(parents=True, exist_ok=True)
    names = {"train": n_train, "val": n_val, "test": n_test, "unlabelled": n_unlab}
    splits: dict[str, Any] = {
        "image_size": size,
        "classes": CLASSES,
        "colors": SCENE_COLOURS.tolist(),
    }
    attrs = {**TINY_STORE_ATTRS, "image_size": size}
    counts = np.zeros(4, np.int64)
    with MaskStoreWriter(root / "masks.h5", attrs) as writer:
        for split, n in names.items():
            splits[split] = [f"{split[:2]}{i:02d}" for i in range(n)]
            for image_id in splits[split]:
                image, label = scene(rng, size)
                Image.fromarray(image).save(prepared / "images" / f"{image_id}.png")
                sub = "unlabelled_gt" if split == "unlabelled" else "labels"
                Image.fromarray(label, mode="L").save(prepared / sub / f"{image_id}.png")
                writer.write(image_id, region_masks(label))
                if split == "train":
                    counts += np.bincount(label[label < 4], minlength=4)
    splits["unlabelled_gt"] = True
    (prepared / "splits.json").write_text(json.dumps(splits))
    fractions = {c: float(100 * counts[i] / counts.sum()) for i, c in enumerate(CLASSES)}
    data = root / "metrics" / "data.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps({"train": {"images": n_train, "class_fractions": fractions}}))
    params = repo_params(image_size=size, ratio=1)
    train = {"epochs": 2, "batch_size": 4, "lr_max": 0.002, "lr_min": 0.0001}
    params["warmup"].update(train)
    params["student"].update(train, epochs=1, iterations=2, mode="offline")
    params["pseudo"]["conf_threshold"] = None  # an untrained teacher is confident nowhere
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {
        "prepared": prepared,
        "masks": root / "masks.h5",
        "data": data,
        "params": root / "params.yaml",
        "splits": prepared / "splits.json",
    }


# --- the quadrant project and the stub model (pseudo-label and evaluation tests) -----------------

# StubModel: left half class 1 with p = 0.8, right half class 2 with p = 0.4 (255p is whole)
LEFT, LEFT_P, RIGHT, RIGHT_P = 1, 0.8, 2, 0.4
QUADRANT_STORE_ATTRS = {
    "generator": "superpixels",
    "model": "",
    "checkpoint_sha256": "",
    "pps": 2,
    "min_region_area": 0,
    "image_size": SIZE,
}


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


def make_quadrant_project(
    root: Path, n_train: int = 2, n_val: int = 1, n_test: int = 2, n_unl: int = 6
) -> tuple[Path, Path]:
    """A prepared-data folder and a mask store (QUADRANT_STORE_ATTRS) under ``root``; returns
    (prepared, masks.h5). Unlabelled images have hidden ground truth; ``u1`` has no masks."""
    rng = np.random.default_rng(0)
    prepared = root / "prepared"
    for sub in ("images", "labels", "unlabelled_gt"):
        (prepared / sub).mkdir(parents=True)
    splits: dict[str, Any] = {"image_size": SIZE, "classes": CLASSES, "colors": COLORS}
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
    ids = [i for split in counts for i in splits[split]]
    with MaskStoreWriter(masks, QUADRANT_STORE_ATTRS, ids) as writer:
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
            (pool_weights is None, None if pool_weights is None else tuple(pool_weights.shape))
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


def write_tiny_checkpoint(path: Path, size: int = SIZE, **extra: Any) -> Path:
    """An untrained opensam-tiny model of CLASSES saved with save_checkpoint (``extra``: more
    checkpoint keys, e.g. ``masks``); the global RNG is left as it was."""
    from opensam.model.segmenter import build_model, save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ClipParams(pretrained=None), [f"a {c}" for c in CLASSES])
    save_checkpoint(path, model, CLASSES, ClipParams(pretrained=None), size, **extra)
    return path


def write_student_project(root: Path) -> dict[str, Path]:
    """:func:`write_tiny_project` (4 train, 2 val, 2 test, 6 unlabelled, 48 px) with an untrained
    teacher (``models/teacher.pt``, recording the store's mask settings and the labelmap colours)
    and its pseudo-labels of the ratio-1 pool (``pseudo/``): the inputs of the student rounds."""
    from opensam.config import load_params
    from opensam.masks.settings import open_mask_store, store_settings
    from opensam.model.segmenter import build_model, save_checkpoint
    from opensam.train.pseudo_labels import generate_pseudo_labels

    p = write_tiny_project(root, 4, 2, 2, 6, size=48)
    params = load_params(p["params"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(params.clip, params.prompts)
    teacher = root / "models" / "teacher.pt"
    settings = store_settings(open_mask_store(p["masks"]))
    save_checkpoint(
        teacher,
        model,
        params.class_names,
        params.clip,
        48,
        epoch=1,
        masks=settings,
        labelmap_colors=SCENE_COLOURS.tolist(),
    )
    pool = json.loads(p["splits"].read_text())["unlabelled"][:4]  # ratio 1 x 4 train images
    generate_pseudo_labels(model, p["prepared"], pool, p["masks"], root / "pseudo", None, 4)
    return {**p, "teacher": teacher, "pseudo": root / "pseudo"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, in the order that keeps both xdist workers busy.

    ``--dist loadfile --no-loadscope-reorder`` hands each worker one module, then a second each,
    then one more whenever a worker finishes one. So worker 1 starts ``test_pipeline.py``, which
    builds the session's tiny DVC project (about 2 minutes), while worker 2 runs the 2-process
    tests; ``test_pipeline_reruns.py`` comes fourth, on worker 2 once those are done, when the
    project is built and it only copies it. A plain ``pytest`` runs them in this order too."""
    first = (
        "test_pipeline.py",
        "test_distributed.py",
        "test_sam_masks.py",
        "test_pipeline_reruns.py",
    )

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return first.index(name) if name in first else len(first)

    items.sort(key=rank)  # stable: the order within each group is kept


def assert_miou_is_the_mean_iou(report: dict[str, Any]) -> None:
    """A metrics report's ``miou`` is the mean of its per-class IoUs over the classes present
    (None = absent from ground truth and prediction), each in 0..100: the documented convention,
    checked independently of ``opensam.eval.metrics``."""
    present = [v for v in report["iou"].values() if v is not None]
    assert present and all(0.0 <= v <= 100.0 for v in present), report
    assert abs(report["miou"] - sum(present) / len(present)) <= 0.01, report
