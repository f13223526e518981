"""Self-supervised ViT backbones (DINOv2, DINOv3, the demo stand-in) through timm, and their dense
patch-token maps.

Real models are timm names with their pretrained tag (``vit_small_patch14_dinov2.lvd142m``,
``vit_base_patch16_dinov3.lvd1689m``). Their weights load through timm's own loader
(``pretrained_cfg_overlay={"file": ...}``, which also converts Meta's original checkpoints), from
a local file or from the local Hugging Face cache. Nothing downloads silently: a missing file is
one line naming it and how to fetch it, as ``clip.pretrained`` does (:mod:`opensam.model.clip`).

``opensam-dino-tiny`` is the demo's stand-in (stage ``demo_dino``): a 4-block timm ViT with 8-pixel
patches, whose weights are a plain ``state_dict`` file.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from opensam.constants import DEMO_DINO_UNTRAINED_KEY
from opensam.errors import InputError

log = logging.getLogger(__name__)

DINO_TINY = "opensam-dino-tiny"
# The stand-in: a timm VisionTransformer small enough to pretrain on 2 CPU cores in minutes.
# Patch 8 gives a 32×32 map on 256² scenes (stride 8); dynamic_img_size lets one model take the
# 64² training crops and the full scenes (the position embedding is resampled per input size).
DINO_TINY_CONFIG: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 3.0,
    "num_classes": 0,
    "global_pool": "avg",
    "fc_norm": False,  # the final norm on every token: the dense map is what is pooled
    "dynamic_img_size": True,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2/v3 and the stand-in normalise images this way
IMAGENET_STD = (0.229, 0.224, 0.225)
# the supported timm families (``<arch>.<tag>``); any timm ViT with patch tokens works too
DINO_EXAMPLES = (
    "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m",
    "vit_small_patch16_dinov3.lvd1689m",
    "vit_base_patch16_dinov3.lvd1689m",
)
DOWNLOAD_ENV = "OPENSAM_ALLOW_DOWNLOAD"
HUB = "hub"  # dino.pretrained: hub = timm's Hugging Face weights from the local cache


def is_gated(model_name: str) -> bool:
    """DINOv3 weights are gated on the Hugging Face Hub (Meta's DINOv3 licence)."""
    return "dinov3" in model_name


def fetch_hint(model_name: str) -> str:
    """How to get ``model_name``'s weights onto an offline machine (one clause)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) or f"timm/{model_name}"
    hint = f"`huggingface-cli download {repo}` on a machine with internet"
    if is_gated(model_name):
        hint = (
            f"accept the DINOv3 licence at https://huggingface.co/{repo} with a Hugging Face "
            f"account, `huggingface-cli login`, then {hint}"
        )
    return hint


def resolve_dino_weights(model_name: str, pretrained: str, allow_download: bool) -> str:
    """A local weights file for ``dino.pretrained``: a file path, or ``hub`` (timm's Hugging
    Face weights, from the local cache unless downloads are allowed). One-line
    :class:`InputError` naming the missing file and how to fetch it."""
    if pretrained != HUB:
        if os.path.isfile(pretrained):
            return pretrained
        how = (
            "run `dvc repro demo_dino`"
            if model_name == DINO_TINY
            else f"get it with {fetch_hint(model_name)} and set dino.pretrained to the file"
        )
        raise InputError(f"{pretrained}: DINO weights for {model_name} not found ({how})")
    if model_name == DINO_TINY:
        raise InputError(f"dino.pretrained: {HUB} needs a timm model, not {DINO_TINY}")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise InputError(f"dino.model '{model_name}': timm has no pretrained weights by that name")
    from huggingface_hub import hf_hub_download

    for local_only in (True, False) if allow_download else (True,):
        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                return str(hf_hub_download(repo, name, local_files_only=local_only))
            except Exception as exc:  # missing from the cache, offline, or gated
                log.debug("%s/%s (local_only=%s): %s", repo, name, local_only, exc)
    also = "" if allow_download else f", or set {DOWNLOAD_ENV}=1 to allow downloads"
    raise InputError(
        f"hf-hub:{repo}/model.safetensors: DINO weights {model_name} are not in the local cache; "
        f"{fetch_hint(model_name)}, or put the file under models/ and set dino.pretrained to its "
        f"path{also}"
    )


def create_dino(
    model_name: str, pretrained: str | None, allow_download: bool | None = None
) -> nn.Module:
    """A timm ViT (fp32, CPU, eval mode) whose patch tokens work at any input size.

    ``pretrained``: a weights file, ``hub`` (timm's weights from the local cache) or None
    (random init: tests, and rebuilding a checkpoint that holds all weights).
    """
    if allow_download is None:
        allow_download = os.environ.get(DOWNLOAD_ENV, "") == "1"
    path = resolve_dino_weights(model_name, pretrained, allow_download) if pretrained else None
    try:
        if model_name == DINO_TINY:
            vit: nn.Module = timm.models.VisionTransformer(**DINO_TINY_CONFIG)
            if path is not None:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(state, dict) and DEMO_DINO_UNTRAINED_KEY in state:
                    raise InputError(f"{path}: {state[DEMO_DINO_UNTRAINED_KEY]}")
                vit.load_state_dict(state)
        else:
            overlay = {"file": path} if path is not None else None
            vit = timm.create_model(
                model_name,
                pretrained=path is not None,
                pretrained_cfg_overlay=overlay,
                num_classes=0,
                dynamic_img_size=True,
            )
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise InputError(
                f"dino.model '{model_name}': unknown timm model (e.g. {', '.join(DINO_EXAMPLES)})"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load as {model_name} weights ({first[:200]})") from None
    except (OSError, ValueError, KeyError, EOFError, TypeError) as exc:
        raise InputError(f"{path}: cannot load as {model_name} weights ({exc})") from None
    log.info("DINO %s, weights: %s", model_name, path or "random init")
    return vit.eval()


def dino_mean_std(vit: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image normalisation (mean, std) of a timm ViT (RGB in [0, 1])."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", IMAGENET_MEAN) if isinstance(cfg, dict) else IMAGENET_MEAN
    std = cfg.get("std", IMAGENET_STD) if isinstance(cfg, dict) else IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class DinoTower(nn.Module):
    """A timm ViT's last-block patch tokens after its final norm, as a (B, D, h, w) map.

    The input is resized to the nearest multiple of the patch size (DINOv2's 14 px patches: 256²
    → 252², an 18×18 grid), so the grid covers the whole image and the aggregation's bilinear
    upsampling (cell i centred at (i + ½)·H/h) is exact. Prefix tokens (CLS, registers) are
    dropped by timm's ``forward_intermediates``.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        patch = cast(Any, vit).patch_embed.patch_size
        self.stride = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.embed_dim = int(cast(Any, vit).embed_dim)

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Grid (h, w) for an (H, W) input: round(H / patch), at least 1."""
        return max(1, round(image_hw[0] / self.stride)), max(1, round(image_hw[1] / self.stride))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, normalised → (B, D, h, w) float, not L2-normalised."""
        h, w = self.grid_hw((images.shape[-2], images.shape[-1]))
        size = (h * self.stride, w * self.stride)
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        vit = cast(Any, self.vit)
        maps = vit.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return cast(torch.Tensor, maps[-1])
