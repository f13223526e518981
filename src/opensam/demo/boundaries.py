"""Pretraining of the demo's SAM stand-in on generated scenes with object and part masks.

The demo's stand-in for SA-1B: scenes come from :func:`opensam.demo.scene.render_scene_objects`
under the corpus's own seed (generator key ``[seed, 3, index]``; kinds 0 and 1 are the demo's
labelled and unlabelled photos, 2 the CLIP captions, so no corpus image is ever a demo photo).
The target of a scene is its class-agnostic border map: 1 on the border between two objects,
:data:`~opensam.masks.boundaries.PART_TARGET` between two parts of one object, 0 elsewhere. No
class name reaches the model: it learns *objectness*, as SAM did from SA-1B's masks.
:func:`pretrain_boundaries` fits a :class:`~opensam.masks.boundaries.BoundaryNet` to it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from opensam.demo.scene import PARTS, render_scene_objects
from opensam.masks.boundaries import PART_TARGET, BoundaryNet
from opensam.parallel.processes import process_map

log = logging.getLogger(__name__)

CORPUS_KIND = 3  # generator key [seed, 3, index]: 0, 1 the demo's photos, 2 the CLIP corpus
StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class BoundaryConfig:
    """Training settings (the ``demo_sam`` params block without the corpus sizes)."""

    steps: int = 1400
    batch_size: int = 8
    crop_size: int = 128
    width: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    border_weight: float = 4.0  # loss weight of border pixels (they are ~5 % of a scene)
    seed: int = 2


def border_target(segments: np.ndarray) -> np.ndarray:
    """(H, W) int segment map (object * PARTS + part) → (H, W) float32 border target: 1 where a
    4-neighbour belongs to another object, PART_TARGET where it is another part of the same one
    (both pixels of a pair are marked, so borders are 2 px wide)."""
    obj = segments // PARTS

    def pair_value(a: tuple[slice, slice], b: tuple[slice, slice]) -> np.ndarray:
        other_part = np.where(segments[a] != segments[b], PART_TARGET, 0.0)
        return np.where(obj[a] != obj[b], 1.0, other_part).astype(np.float32)

    out = np.zeros(segments.shape, np.float32)
    full = slice(None)
    for a, b in (
        ((full, slice(0, -1)), (full, slice(1, None))),
        ((slice(0, -1), full), (slice(1, None), full)),
    ):
        value = pair_value(a, b)
        np.maximum(out[a], value, out=out[a])
        np.maximum(out[b], value, out=out[b])
    return out


def render_boundary_scene(
    seed: int, index: int, scene_size: int, render_hw: tuple[int, int] = (342, 512)
) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of the corpus ``seed``, squashed to ``scene_size``² as ``prepare`` squashes
    photos: RGB (S, S, 3) uint8 and its segment map (S, S) int32 (deterministic)."""
    rng = np.random.default_rng([seed, CORPUS_KIND, index])
    img, segments = render_scene_objects(rng, render_hw[1], render_hw[0])
    size = (scene_size, scene_size)
    image = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    seg = cv2.resize(segments, size, interpolation=cv2.INTER_NEAREST)
    return image, seg


def _render_task(task: tuple[int, int, int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return render_boundary_scene(*task)


def render_boundary_corpus(
    seed: int,
    count: int,
    scene_size: int,
    workers: int = 1,
    start: int = 0,
    render_hw: tuple[int, int] = (342, 512),
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``start`` .. ``start + count - 1``: images (N, S, S, 3) uint8 and segment maps
    (N, S, S) int32, rendered in ``workers`` processes if > 1."""
    tasks = [(seed, i, scene_size, render_hw) for i in range(start, start + count)]
    scenes = list(process_map(_render_task, tasks, workers, min_tasks=8))
    return np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])


def _batch(
    rng: np.random.Generator,
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    crop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, size = images.shape[:2]
    idx = rng.integers(0, n, batch_size)
    ys, xs = rng.integers(0, size - crop + 1, (2, batch_size))
    img = np.stack(
        [images[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs, strict=True)]
    )
    tgt = np.stack(
        [targets[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs, strict=True)]
    )
    flip = rng.random(batch_size) < 0.5
    img[flip], tgt[flip] = img[flip, :, ::-1], tgt[flip, :, ::-1]
    turn = rng.random(batch_size) < 0.5  # borders have no preferred direction
    img[turn] = img[turn].transpose(0, 2, 1, 3)
    tgt[turn] = tgt[turn].transpose(0, 2, 1)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2).float() / 255.0
    gain = torch.from_numpy(rng.uniform(0.7, 1.3, (batch_size, 3, 1, 1)).astype(np.float32))
    x = (x * gain).clamp(0, 1)  # light and white balance vary more than the scenes do
    return x, torch.from_numpy(np.ascontiguousarray(tgt))[:, None]


def pretrain_boundaries(
    net: BoundaryNet,
    images: np.ndarray,
    targets: np.ndarray,
    cfg: BoundaryConfig,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Fit ``net`` to the border targets (N, S, S) of ``images`` (N, S, S, 3) with a weighted
    binary cross-entropy on random crops, AdamW and a cosine schedule. Returns the loss per step."""
    if images.shape[1] < cfg.crop_size:
        raise ValueError(f"crop_size {cfg.crop_size} exceeds the scene size {images.shape[1]}")
    rng = np.random.default_rng([cfg.seed, CORPUS_KIND, 1 << 20])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    net.train()
    losses: list[float] = []
    for step in range(cfg.steps):
        x, y = _batch(rng, images, targets, cfg.batch_size, cfg.crop_size)
        weight = 1.0 + (cfg.border_weight - 1.0) * (y > 0).float()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y, weight=weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"demo SAM pretraining: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("demo SAM step %d/%d: loss %.4f", step + 1, cfg.steps, losses[-1])
    return losses
