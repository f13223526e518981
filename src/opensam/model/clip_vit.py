"""Dense maps from open_clip's ViT image towers (seed 2's ``ViT-B-16`` and ``ViT-B-16-SigLIP``).

A CLIP ViT pools its patch tokens into one image vector in its last step (a CLS token or an
attention pool), so its patch tokens are not in the text space. Both towers here use the
MaskCLIP recipe (Zhou et al., ECCV 2022): the last pooling step is applied to every location
*alone*, which for attention means its value embedding, so a token's output is what the pooled
vector would be if the image held only that token:

- ``ViT-B-16`` (open_clip ``VisionTransformer``, CLS pooling): the blocks but the last run as
  usual; in the last block each token goes through ``ln_1`` → value projection → ``out_proj``
  (no query-key attention, residual or MLP, as MaskCLIP), then ``ln_post`` and ``proj``.
- ``ViT-B-16-SigLIP`` (a timm trunk with a MAP attention pool): all blocks and the final norm
  run as usual; each token goes through the pool's value projection → ``proj`` → ``+ mlp(norm)``
  (the pool with one key, exactly), then ``fc_norm`` and the tower's projection.

Position embeddings are resampled (bicubic) to the input's grid, so 256² inputs give 16×16.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Format, resample_abs_pos_embed
from torch import nn


class OpenClipViTTower(nn.Module):
    """open_clip ``VisionTransformer`` → (B, D, H/p, W/p), MaskCLIP's last block (module doc)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        v = cast(Any, visual)
        if getattr(v, "attn_pool", None) is not None or v.proj is None:
            raise ValueError("open_clip ViT with an attention pool or without proj: unsupported")
        self.visual = visual
        patch = v.conv1.kernel_size
        self.stride = int(patch[0])
        self.embed_dim = int(v.proj.shape[1])

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Grid (h, w) for an (H, W) input: H // patch, W // patch."""
        return image_hw[0] // self.stride, image_hw[1] // self.stride

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = cast(Any, self.visual)
        x = v.conv1(images)  # (B, W, h, w)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        old = v.grid_size if isinstance(v.grid_size, tuple) else (v.grid_size, v.grid_size)
        pos = resample_abs_pos_embed(v.positional_embedding[None], list(hw), list(old), 1)[0]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(x), hw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, CLIP-normalised → (B, D, h, w) float, not L2-normalised."""
        v = cast(Any, self.visual)
        x, (h, w) = self._tokens(images)
        blocks = list(v.transformer.resblocks)
        batch_first = getattr(v.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        x = x if batch_first else x.transpose(0, 1)
        last = blocks[-1]
        attn = cast(nn.MultiheadAttention, last.attn)
        width = x.shape[-1]
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        value = F.linear(last.ln_1(x[:, 1:]), attn.in_proj_weight[2 * width :], bias)
        x = v.ln_post(attn.out_proj(value)) @ v.proj  # (B, h·w, D)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()


class TimmMapViTTower(nn.Module):
    """open_clip timm tower with a MAP attention pool (SigLIP) → (B, D, H/p, W/p) (module doc)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        trunk = cast(Any, getattr(visual, "trunk", None))
        pool = getattr(trunk, "attn_pool", None)
        if pool is None or getattr(pool, "mlp", None) is None:
            raise ValueError("timm ViT tower without a MAP attention pool: unsupported")
        # patch tokens at any input size (timm resamples the position embedding per call)
        trunk.dynamic_img_size = True
        trunk.patch_embed.strict_img_size = False
        trunk.patch_embed.flatten = False
        trunk.patch_embed.output_fmt = Format.NHWC
        self.trunk: nn.Module = trunk
        self.proj_head: nn.Module = cast(nn.Module, cast(Any, visual).head)
        self.stride = int(trunk.patch_embed.patch_size[0])
        dims = [m.out_features for m in self.proj_head.modules() if isinstance(m, nn.Linear)]
        self.embed_dim = int(dims[-1]) if dims else int(trunk.embed_dim)

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Grid (h, w) for an (H, W) input: H // patch, W // patch."""
        return image_hw[0] // self.stride, image_hw[1] // self.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, normalised → (B, D, h, w) float, not L2-normalised."""
        trunk = cast(Any, self.trunk)
        maps = trunk.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]
        b, c, h, w = maps.shape
        x = maps.flatten(2).transpose(1, 2)  # (B, h·w, C)
        pool = trunk.attn_pool
        value = F.linear(x, pool.kv.weight[c:], None if pool.kv.bias is None else pool.kv.bias[c:])
        x = pool.proj(value)
        x = x + pool.mlp(pool.norm(x))
        x = self.proj_head(trunk.fc_norm(x))
        return x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
