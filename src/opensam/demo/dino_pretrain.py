"""Self-distillation (DINO) pretraining of the demo's small ViT on generated scenes.

The demo's stand-in for DINOv2's LVD-142M pretraining: :func:`pretrain_dino` trains
``opensam-dino-tiny`` (:mod:`opensam.model.dino`) from random init with lightly's DINO pieces,
used as the library ships them: :class:`lightly.transforms.DINOTransform` (two global and
several local multi-crop views with colour jitter, blur and solarisation),
:class:`lightly.models.modules.DINOProjectionHead`, :class:`lightly.loss.DINOLoss` (centring,
teacher-temperature warm-up) and the EMA teacher (``update_momentum``, cosine momentum). No
pixel label reaches the loss.

The representation given to the head is the mean of the *dense* patch-token map (after the final
norm, exactly :class:`~opensam.model.dino.DinoTower`'s map), not a CLS token, so what is trained
is the per-location feature the segmenter pools, as the demo CLIP does (``dense_mean``).

Crops are cut at about the segmenter's scale: a global view's side is 1/4 to 1/2 of the scene's
(64 to 128 px of a 256² scene, resized to ``global_crop``), a local view's 1/8 to 1/4.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn

from opensam.demo.captions import Scene
from opensam.model.dino import IMAGENET_MEAN, IMAGENET_STD, DinoTower

log = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]
GLOBAL_SIDE = (0.25, 0.5)  # global view side, as a fraction of the scene's
LOCAL_SIDE = (0.125, 0.25)  # local view side
HEAD_HIDDEN = 512
HEAD_BOTTLENECK = 64


@dataclass(frozen=True)
class DinoPretrainConfig:
    """Training settings (the ``demo_dino`` params block without the corpus sizes)."""

    steps: int = 300
    batch_size: int = 32
    global_crop: int = 64
    local_crop: int = 32
    local_views: int = 4
    out_dim: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.04
    warmup_steps: int = 30
    momentum: float = 0.99
    seed: int = 3


class DenseMeanNet(nn.Module):
    """ViT → mean of its dense map → DINO projection head: (B, 3, s, s) normalised → (B, K)."""

    def __init__(self, vit: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.tower = DinoTower(vit)
        self.head = DINOProjectionHead(
            self.tower.embed_dim, HEAD_HIDDEN, HEAD_BOTTLENECK, out_dim, freeze_last_layer=1
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.head(self.tower(images).mean(dim=(2, 3))))


def make_transform(cfg: DinoPretrainConfig) -> DINOTransform:
    """lightly's DINO multi-crop views at the crop sizes and scales above (ImageNet norm)."""
    return DINOTransform(
        global_crop_size=cfg.global_crop,
        global_crop_scale=(GLOBAL_SIDE[0] ** 2, GLOBAL_SIDE[1] ** 2),
        local_crop_size=cfg.local_crop,
        local_crop_scale=(LOCAL_SIDE[0] ** 2, LOCAL_SIDE[1] ** 2),
        n_local_views=cfg.local_views,
        normalize={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )


def _views(
    rng: np.random.Generator, scenes: Sequence[Scene], transform: Any, batch: int
) -> list[torch.Tensor]:
    """One batch of multi-crop views: a (B, 3, s, s) tensor per view, global views first."""
    per_image = [
        transform(Image.fromarray(scenes[int(j)].image))
        for j in rng.integers(len(scenes), size=batch)
    ]
    return [torch.stack(views) for views in zip(*per_image, strict=True)]


def _lr_at(step: int, cfg: DinoPretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def pretrain_dino(
    vit: nn.Module,
    scenes: Sequence[Scene],
    cfg: DinoPretrainConfig,
    on_step: StepCallback | None = None,
    log_every: int = 10,
) -> list[float]:
    """Train ``vit`` (a timm ViT, in place) with DINO on multi-crop views of ``scenes``. Returns
    the loss of every step; ``on_step(step, mean loss)`` every ``log_every`` steps and at the
    end. Seeded by ``cfg.seed`` (views and the torch generator)."""
    if not scenes:
        raise ValueError("pretrain_dino needs at least one scene")
    torch.manual_seed(cfg.seed)
    student = DenseMeanNet(vit, cfg.out_dim)
    # a second net, not a deepcopy: the head's weight_norm cannot be deep-copied
    teacher = DenseMeanNet(copy.deepcopy(vit), cfg.out_dim)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp_epochs=cfg.warmup_steps)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    transform = make_transform(cfg)
    rng = np.random.default_rng([cfg.seed, 13])
    losses: list[float] = []
    student.train()
    for step in range(cfg.steps):
        momentum = cosine_schedule(step, cfg.steps, cfg.momentum, 1.0)
        update_momentum(student, teacher, m=momentum)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        views = _views(rng, scenes, transform, cfg.batch_size)
        with torch.no_grad():
            teacher_out = [teacher(v) for v in views[:2]]
        student_out = [student(v) for v in views]
        loss = criterion(teacher_out, student_out, epoch=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        student.head.cancel_last_layer_gradients(current_epoch=step)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            on_step(step + 1, float(np.mean(losses[-log_every:])))
    vit.eval()
    log.info("DINO pretrained %d steps; last loss %.3f", cfg.steps, float(np.mean(losses[-20:])))
    return losses


@torch.no_grad()
def prototype_accuracy(vit: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Nearest-class-mean accuracy of the dense-mean features of ``images`` ((N, 3, s, s) in
    [0, 1]; ``targets`` (N,) int64): prototypes from the even-indexed images, accuracy on the
    odd ones (a fraction; the held-out check of ``metrics/demo_dino.json``)."""
    vit.eval()
    tower = DinoTower(vit)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = torch.cat([tower((b - mean) / std).mean(dim=(2, 3)) for b in images.split(64)])
    feats = F.normalize(feats, dim=1)
    fit, test = torch.arange(len(targets)) % 2 == 0, torch.arange(len(targets)) % 2 == 1
    classes = int(targets.max()) + 1
    protos = torch.stack(
        [
            feats[fit & (targets == c)].mean(0) if (fit & (targets == c)).any() else feats[0] * 0
            for c in range(classes)
        ]
    )
    pred = (feats[test] @ F.normalize(protos, dim=1).T).argmax(1)
    return float((pred == targets[test]).float().mean())


MIN_REGION_CELLS = 4  # a region pooled by the probe covers at least this many grid cells


@torch.no_grad()
def scene_cells(
    vit: nn.Module, scenes: Sequence[Scene], batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense map of whole ``scenes`` (what the segmenter pools), one row per grid cell:
    L2-normalised features (N, h·w, D) and the class drawn at each cell's centre (N, h·w)."""
    vit.eval()
    tower = DinoTower(vit)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes]).float()
    maps = torch.cat([tower((b / 255 - mean) / std) for b in images.split(batch)])
    n, d, h, w = maps.shape
    size_h, size_w = scenes[0].drawn.shape
    ys = ((np.arange(h) + 0.5) * size_h / h).astype(int)
    xs = ((np.arange(w) + 0.5) * size_w / w).astype(int)
    labels = np.stack([s.drawn[np.ix_(ys, xs)] for s in scenes]).astype(np.int64)
    features = F.normalize(maps.permute(0, 2, 3, 1).reshape(n, h * w, d), dim=-1)
    return features, torch.from_numpy(labels).reshape(n, h * w)


def region_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
) -> float:
    """How well mask-pooled regions of the dense map tell the classes apart, as the segmenter's
    aggregation pools its masks: the features of each (scene, class) region (the cells drawn
    with that class, at least :data:`MIN_REGION_CELLS`) are averaged and L2-normalised; class
    prototypes are the mean region of the first half of the scenes, and each region of the
    second half goes to its nearest prototype (cosine). Returns the accuracy averaged over the
    classes present there (balanced: the background is one class of four, not most regions).
    No training, seed or hyperparameter of its own, unlike a fitted head.

    ``features`` (N, cells, D), ``labels`` (N, cells) int64 (other labels are left out); N ≥ 2.
    """
    if len(features) < 2:
        raise ValueError("region_probe_accuracy needs at least two scenes (fit and score halves)")
    half = len(features) // 2
    vectors, targets, second = [], [], []
    for i in range(len(features)):
        for k, c in enumerate(classes):
            cells = labels[i] == c
            if int(cells.sum()) >= MIN_REGION_CELLS:
                vectors.append(F.normalize(features[i][cells].mean(dim=0), dim=0))
                targets.append(k)
                second.append(i >= half)
    if not vectors:
        return 0.0
    regions, target, held = torch.stack(vectors), torch.tensor(targets), torch.tensor(second)
    protos = torch.stack(
        [
            regions[~held & (target == k)].mean(dim=0)
            if bool((~held & (target == k)).any())
            else torch.zeros(regions.shape[1])
            for k in range(len(classes))
        ]
    )
    pred = (regions[held] @ F.normalize(protos, dim=1).T).argmax(dim=1)
    recalls = [
        float((pred[target[held] == k] == k).float().mean())
        for k in range(len(classes))
        if bool((target[held] == k).any())
    ]
    return float(np.mean(recalls)) if recalls else 0.0


def heldout_accuracies(
    vit: nn.Module,
    scenes: Sequence[Scene],
    images: torch.Tensor,
    targets: torch.Tensor,
    classes: Sequence[int],
) -> dict[str, float]:
    """Both held-out measures of ``vit`` in percent, for ``metrics/demo_dino.json``:
    ``prototype_accuracy`` on single-object crops (``images``, ``targets``; see
    :func:`prototype_accuracy`) and ``region_probe_accuracy`` on the whole ``scenes``' dense
    map (:func:`scene_cells`, :func:`region_probe_accuracy`)."""
    return {
        "prototype_accuracy": round(100 * prototype_accuracy(vit, images, targets), 2),
        "region_probe_accuracy": round(
            100 * region_probe_accuracy(*scene_cells(vit, scenes), classes), 2
        ),
    }
