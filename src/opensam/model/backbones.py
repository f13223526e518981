"""Backbones by name (``model.backbone``): each gives a dense (B, D, h, w) map that the NU mask
aggregation pools (:mod:`opensam.model.aggregation`).

- ``clip``: the open_clip image tower (:func:`clip_dense_tower`: timm ConvNeXt towers as
  :class:`~opensam.model.clip.DenseImageTower`, ViT towers as :mod:`opensam.model.clip_vit`);
- ``dino``: a timm self-supervised ViT's patch tokens (:class:`~opensam.model.dino.DinoTower`);
- ``clip+dino``: :class:`ConcatTower`, both maps on the DINO grid, each L2-normalised per
  location, concatenated (CLIP channels first).

Every tower takes images normalised with the model's ``mean``/``std`` (CLIP's for ``clip`` and
``clip+dino``, DINO's for ``dino``) and has ``stride``, ``embed_dim`` and ``grid_hw``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from opensam.config import BACKBONE_NAMES
from opensam.model.clip import DenseImageTower
from opensam.model.clip_vit import OpenClipViTTower, TimmMapViTTower
from opensam.model.dino import DinoTower

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


def clip_dense_tower(visual: nn.Module) -> nn.Module:
    """The dense tower of an open_clip image tower: ConvNeXt (stride 32), open_clip ViT or a timm
    ViT with a MAP pool (SigLIP; stride = patch). ValueError for other towers."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and getattr(trunk, "attn_pool", None) is not None:
        return TimmMapViTTower(visual)
    if hasattr(visual, "conv1") and hasattr(visual, "transformer"):
        return OpenClipViTTower(visual)
    return DenseImageTower(visual)


class ConcatTower(nn.Module):
    """CLIP and DINO maps on the DINO grid (the finer one; CLIP's is resampled bilinearly), each
    L2-normalised per location, concatenated: (B, D_clip + D_dino, h, w).

    The input is CLIP-normalised; the buffers ``dino_scale``/``dino_shift`` (3,) turn it into
    DINO's normalisation (``x · std_c / std_d + (mean_c − mean_d) / std_d``).
    """

    dino_scale: torch.Tensor
    dino_shift: torch.Tensor

    def __init__(
        self, clip: nn.Module, dino: nn.Module, clip_norm: Normalisation, dino_norm: Normalisation
    ) -> None:
        super().__init__()
        self.clip = clip
        self.dino = dino
        (mc, sc), (md, sd) = clip_norm, dino_norm
        scale = [c / d for c, d in zip(sc, sd, strict=True)]
        shift = [(a - b) / d for a, b, d in zip(mc, md, sd, strict=True)]
        self.register_buffer("dino_scale", torch.tensor(scale).view(1, 3, 1, 1))
        self.register_buffer("dino_shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.stride = int(cast(Any, dino).stride)
        self.embed_dim = int(cast(Any, clip).embed_dim) + int(cast(Any, dino).embed_dim)

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The DINO tower's grid."""
        return cast(tuple[int, int], cast(Any, self.dino).grid_hw(image_hw))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised → (B, D_clip + D_dino, h, w), each part unit-norm."""
        dino = self.dino(images * self.dino_scale + self.dino_shift)
        clip = self.clip(images)
        if clip.shape[-2:] != dino.shape[-2:]:
            clip = F.interpolate(clip, size=dino.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([F.normalize(clip, dim=1), F.normalize(dino.to(clip.dtype), dim=1)], 1)


def _clip_only(clip: nn.Module | None, dino: nn.Module | None, **_: Any) -> nn.Module:
    if clip is None:
        raise ValueError("backbone clip needs a CLIP image tower")
    return clip_dense_tower(clip)


def _dino_only(clip: nn.Module | None, dino: nn.Module | None, **_: Any) -> nn.Module:
    if dino is None:
        raise ValueError("backbone dino needs a DINO ViT")
    return DinoTower(dino)


def _concat(
    clip: nn.Module | None,
    dino: nn.Module | None,
    clip_norm: Normalisation | None = None,
    dino_norm: Normalisation | None = None,
) -> nn.Module:
    if clip is None or dino is None or clip_norm is None or dino_norm is None:
        raise ValueError("backbone clip+dino needs both towers and both normalisations")
    return ConcatTower(clip_dense_tower(clip), DinoTower(dino), clip_norm, dino_norm)


TowerBuilder = Callable[..., nn.Module]
# name → builder(clip visual or None, dino ViT or None, clip_norm=..., dino_norm=...)
BACKBONES: dict[str, TowerBuilder] = {"clip": _clip_only, "dino": _dino_only, "clip+dino": _concat}
assert tuple(BACKBONES) == BACKBONE_NAMES, "config.BACKBONE_NAMES lists the registry"


def uses_clip(backbone: str) -> bool:
    """Whether ``backbone`` reads a CLIP image tower (and so has text embeddings)."""
    return "clip" in backbone.split("+")


def uses_dino(backbone: str) -> bool:
    """Whether ``backbone`` reads a DINO ViT."""
    return "dino" in backbone.split("+")


def build_tower(
    backbone: str,
    clip: nn.Module | None,
    dino: nn.Module | None,
    clip_norm: Normalisation | None = None,
    dino_norm: Normalisation | None = None,
) -> nn.Module:
    """The dense tower of ``backbone`` (:data:`BACKBONES`) from the towers it uses."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[backbone](clip, dino, clip_norm=clip_norm, dino_norm=dino_norm)
