"""Contrastive pretraining of a small open_clip model on a generated image-caption corpus.

The demo's stand-in for LAION pretraining: :func:`pretrain_clip` trains a randomly initialised
open_clip model (``opensam-tiny``) with open_clip's own :class:`open_clip.ClipLoss` on random
crops of :mod:`opensam.demo.captions` scenes and their captions. The image feature of a crop is
the mean of the *dense* embedding map (trunk → per-location LayerNorm → projection, exactly
:class:`~opensam.clip_model.DenseImageTower`), so what is trained is the per-location alignment
that zero-shot segmentation reads; ``pool="encode_image"`` uses open_clip's pooled path instead.
:func:`save_open_clip_weights` writes a plain open_clip ``state_dict``: the file a user would
download, loadable with ``clip.pretrained: <path>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip
import torch
from torch import nn

from opensam.demo.captions import Scene, object_crop, sample_crop
from opensam.model.clip import DenseImageTower, encode_prompts, image_mean_std
from opensam.runtime import save_torch

log = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class PretrainConfig:
    """Training settings (the ``demo_clip`` params block without the corpus sizes)."""

    steps: int = 300
    batch_size: int = 64
    crop_size: int = 64
    min_crop: float = 0.25  # smallest and largest crop side, as a fraction of the scene's
    max_crop: float = 0.5
    focus: float = 0.8  # share of crops centred on an object
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    pool: str = "dense_mean"  # dense_mean | encode_image
    seed: int = 1


class _ImageFeatures(nn.Module):
    """(B, 3, H, W) in [0, 1] → (B, D) L2-normalised image features of a CLIP model."""

    def __init__(self, clip_model: nn.Module, pool: str) -> None:
        super().__init__()
        if pool not in ("dense_mean", "encode_image"):
            raise ValueError(f"pool '{pool}': expected dense_mean or encode_image")
        self.clip_model = clip_model
        self.pool = pool
        self.dense = DenseImageTower(cast(Any, clip_model).visual)
        mean, std = image_mean_std(clip_model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - cast(torch.Tensor, self.mean)) / cast(torch.Tensor, self.std)
        if self.pool == "encode_image":
            feats = cast(Any, self.clip_model).encode_image(x)
        else:
            feats = self.dense(x).mean(dim=(2, 3))
        return nn.functional.normalize(feats, dim=-1)


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """N (H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1]."""
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 2% of ``cfg.lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(
    rng: np.random.Generator, scenes: Sequence[Scene], cfg: PretrainConfig
) -> tuple[torch.Tensor, list[str]]:
    crops, texts = [], []
    for j in rng.integers(len(scenes), size=cfg.batch_size):
        image, text = sample_crop(
            rng, scenes[int(j)], cfg.crop_size, cfg.min_crop, cfg.focus, cfg.max_crop
        )
        crops.append(image)
        texts.append(text)
    return _to_tensor(crops), texts


def pretrain_clip(
    clip_model: nn.Module,
    tokenizer: Any,
    scenes: Sequence[Scene],
    cfg: PretrainConfig,
    on_step: StepCallback | None = None,
    log_every: int = 10,
) -> list[float]:
    """Train ``clip_model`` (an open_clip CLIP, in place; ``tokenizer`` its tokenizer) on crops
    of ``scenes`` and their captions with :class:`open_clip.ClipLoss`. Returns the loss of every
    step; ``on_step(step, mean loss)`` is called every ``log_every`` steps and after the last."""
    if not scenes:
        raise ValueError("pretrain_clip needs at least one scene")
    model_any = cast(Any, clip_model)
    features = _ImageFeatures(clip_model, cfg.pool)
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in clip_model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [
        p for n, p in clip_model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    rng = np.random.default_rng([cfg.seed, 7])
    token_cache: dict[str, torch.Tensor] = {}
    clip_model.train()
    losses: list[float] = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        images, texts = _batch(rng, scenes, cfg)
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            token_cache.update(zip(missing, tokenizer(missing), strict=True))
        tokens = torch.stack([token_cache[t] for t in texts])
        img = features(images)
        txt = model_any.encode_text(tokens, normalize=True)
        loss = loss_fn(img, txt, model_any.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model_any.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if on_step is not None and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            on_step(step + 1, float(np.mean(losses[-log_every:])))
    clip_model.eval()
    log.info("pretrained %d steps; last loss %.3f", cfg.steps, float(np.mean(losses[-20:])))
    return losses


def heldout_crops(
    scenes: Sequence[Scene], classes: Sequence[int], crop_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One single-object crop per (scene, class) where one is found: images (N, 3, s, s) in
    [0, 1] and the index into ``classes`` (N,) int64 (the held-out image classification set)."""
    rng = np.random.default_rng([seed, 11])
    images, targets = [], []
    for scene in scenes:
        for k, cls in enumerate(classes):
            crop = object_crop(rng, scene, cls, crop_size)
            if crop is not None:
                images.append(crop)
                targets.append(k)
    if not images:
        raise ValueError("no single-object crop found in the held-out scenes")
    return _to_tensor(images), torch.tensor(targets, dtype=torch.int64)


@torch.no_grad()
def zero_shot_accuracy(
    clip_model: nn.Module,
    tokenizer: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    prompts: list[str],
    pool: str = "dense_mean",
) -> tuple[float, list[float]]:
    """Zero-shot image classification of ``images`` against the ``prompts``: overall accuracy
    and the accuracy per prompt (NaN where a prompt has no image), as fractions."""
    clip_model.eval()
    text = encode_prompts(clip_model, tokenizer, prompts, False)
    features = _ImageFeatures(clip_model, pool).eval()
    pred = torch.cat([(features(b) @ text.T).argmax(1) for b in images.split(64)])
    hit = (pred == targets).float()
    per = [
        float(hit[targets == k].mean()) if (targets == k).any() else math.nan
        for k in range(len(prompts))
    ]
    return float(hit.mean()), per


def save_open_clip_weights(clip_model: nn.Module, path: str | Path) -> None:
    """Write ``clip_model.state_dict()`` (CPU tensors only, so ``weights_only=True`` loads it)
    atomically: the format of an open_clip ``.bin`` / ``.pt`` release."""
    state = {k: v.detach().cpu().clone() for k, v in clip_model.state_dict().items()}
    save_torch(state, path)
