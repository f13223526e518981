"""SAM loading (registry, checkpoint checks) and a faster automatic mask generator.

:class:`SamMaskGenerator` keeps ``SamAutomaticMaskGenerator``'s semantics and returns masks at
the prepared resolution. What it does instead of stock (each measured in ``bench/masks.py``):

- encoder: the decomposed rel-pos bias goes to ``scaled_dot_product_attention`` (stock adds it
  to the (heads, 4096, 4096) map in two more passes); bias, GELU and residuals are fused into
  the GEMMs (oneDNN on CPU);
- decoder: the first layer's image side is the same for every prompt and is projected once;
  later projections of the per-prompt (4096, C) maps are folded into the 7 tokens
  (``(q W_k) x^T`` for ``q (x W_k^T)^T``); the upscaling head is two matmuls in channels-last
  form, and runs only for prompts with a mask that can pass ``pred_iou_thresh``;
- post-processing: stock's 256 -> 1024 -> crop -> output bilinear chain is linear and separable,
  so it is two small matrix products; masks stay boolean tensors (no RLE round trips).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import modeling, sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as vit
from segment_anything.modeling import transformer as two_way
from segment_anything.utils import amg
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torchvision.ops import nms

from opensam.config import SamParams
from opensam.errors import InputError
from opensam.mask_store import MaskSet, boxes_xywh

log = logging.getLogger(__name__)

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINT_NAMES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
CROP_NMS_THRESH = 0.7  # stock's crop_nms_thresh default, also its small-region NMS floor
STABILITY_SCORE_OFFSET = 1.0  # stock's default
_HEADS_PER_CHUNK = 4  # bounds the (heads, 4096, 4096) rel-pos bias of global attention


def tie_upscaling_kernels(sam: Sam) -> Sam:
    """Give the decoder's 2x2 transposed convs one kernel for all four sub-pixels (in place).

    For random weights only (tests, benchmarks): masks then come out as blobs, not checkerboard
    textures whose many runs would make stock's RLE encoding unrealistically slow.
    """
    with torch.no_grad():
        for conv in (sam.mask_decoder.output_upscaling[0], sam.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[:, :, :1, :1].expand_as(conv.weight))
    return sam


def build_sam_tiny() -> Sam:
    """Random SAM with the real geometry (1024 input, 64x64 embedding, 256x256 low-res masks)
    and tiny widths, upscaling kernels tied: for tests and ``bench/masks.py --quick``."""
    dim = 32
    encoder = modeling.ImageEncoderViT(
        depth=2, embed_dim=64, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=(1,), window_size=14, out_chans=dim,
    )  # fmt: skip
    prompt = modeling.PromptEncoder(embed_dim=dim, image_embedding_size=(64, 64),
                                    input_image_size=(1024, 1024), mask_in_chans=4)  # fmt: skip
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
    )  # fmt: skip
    return tie_upscaling_kernels(Sam(encoder, prompt, decoder)).eval()


SAM_BUILDERS: dict[str, Callable[[], Sam]] = {
    **{name: sam_model_registry[name] for name in ("vit_h", "vit_l", "vit_b")},
    "tiny": build_sam_tiny,
}
_SIGNATURES = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b", (64, 2): "tiny"}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name.split(":")[0] != "cuda":
        raise InputError(f"sam.device: expected auto, cpu or cuda, got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise InputError(f"sam.device: {name} requested but CUDA is not available")
    return torch.device(name)


def _describe_state_dict(state: dict[str, Any]) -> str:
    """Name the SAM variant a state dict is for (by encoder width and depth)."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(weight, Tensor):
        return "it is not a SAM state dict (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    name, shape = _SIGNATURES.get((weight.shape[0], depth)), f"{weight.shape[0]} wide, {depth} deep"
    return f"it looks like {name} ({shape} encoder)" if name else f"unknown SAM variant ({shape})"


def load_sam(model: str, checkpoint: str | Path | None, device: str = "auto") -> Sam:
    """Build SAM ``model`` (vit_h, vit_l, vit_b, tiny), load ``checkpoint``, move to ``device``.

    ``checkpoint=None`` keeps random weights (logged as a warning). Raises :class:`InputError`
    for an unknown model, a missing file (naming the official download), an unreadable file or
    a checkpoint of another SAM variant (naming the variant it looks like).
    """
    if model not in SAM_BUILDERS:
        raise InputError(
            f"sam.model: unknown SAM model {model!r} (known: {', '.join(SAM_BUILDERS)})"
        )
    dev, sam = resolve_device(device), SAM_BUILDERS[model]()
    if checkpoint is None:
        log.warning("sam.checkpoint is null: SAM %s has random weights (tests/demo only)", model)
        return sam.to(dev).eval()
    path, name = Path(checkpoint), SAM_CHECKPOINT_NAMES.get(model)
    if not path.is_file():
        hint = f"download {SAM_URL}{name}" if name else f"{model} has no official checkpoint"
        raise InputError(f"{path}: SAM checkpoint not found ({hint}, or set sam.checkpoint: null)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InputError(f"{path}: cannot read SAM checkpoint ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a SAM checkpoint (expected a state dict)")
    try:
        sam.load_state_dict(state)
    except RuntimeError:
        what = _describe_state_dict(state)
        raise InputError(f"{path}: not a sam.model={model} checkpoint; {what}") from None
    log.info("loaded SAM %s from %s", model, path)
    return sam.to(dev).eval()


def _linear(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool = False,
            residual: Tensor | None = None) -> Tensor:  # fmt: skip
    """gelu(x @ weight.T + bias) or residual + x @ weight.T + bias; x (M, K), weight (N, K).

    On CPU, oneDNN's fused linear applies the bias, GELU or residual in the GEMM epilogue (the
    same values up to rounding; bias + GELU ~1.8x faster than addmm then gelu)."""
    if x.device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        kind, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, kind, [], algorithm)
    out = torch.addmm(bias, x, weight.T)
    out = F.gelu(out) if gelu else out
    return out if residual is None else residual + out


def _vit_attention(attn: vit.Attention, x: Tensor, residual: Tensor | None) -> Tensor:
    """ViT ``Attention.forward`` (+ residual) with the rel-pos bias given to SDPA, heads in
    chunks where N is large: x (B, H, W, C) -> (B, H, W, C)."""
    (b, h, w, c), nh, n = x.shape, attn.num_heads, x.shape[1] * x.shape[2]
    qkv = _linear(x.reshape(b * n, c), attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.view(b, n, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, d)
    if attn.use_rel_pos:
        rel_h, rel_w = (
            vit.get_rel_pos(s, s, t) for s, t in ((h, attn.rel_pos_h), (w, attn.rel_pos_w))
        )
    out = x.new_empty(b, n, nh, q.shape[-1])
    chunk = _HEADS_PER_CHUNK if n > 1024 else nh
    for s in range(0, nh, chunk):
        qs, ks, vs = (t[:, s : s + chunk] for t in (q, k, v))
        bias = None
        if attn.use_rel_pos:
            rq = qs.reshape(-1, h, w, qs.shape[-1])
            # contiguous: einsum returns permuted views, and a broadcast sum of those would
            # inherit their layout and need a second (heads, N, N) copy to reshape
            rh = torch.einsum("bhwc,hkc->bhwk", rq, rel_h).contiguous()
            rw = torch.einsum("bhwc,wkc->bhwk", rq, rel_w).contiguous()
            bias = (rh[..., :, None] + rw[..., None, :]).view(*qs.shape[:3], n)
        sdpa = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=attn.scale)
        out[:, :, s : s + chunk] = sdpa.transpose(1, 2)
    res = None if residual is None else residual.reshape(b * n, c)
    return _linear(out.view(b * n, c), attn.proj.weight, attn.proj.bias, residual=res).view(x.shape)


def _vit_mlp(mlp: modeling.common.MLPBlock, x: Tensor, residual: Tensor) -> Tensor:
    """residual + ``MLPBlock`` (x) with bias, exact GELU and residual fused into the GEMMs."""
    if not isinstance(mlp.act, torch.nn.GELU) or mlp.act.approximate != "none":
        return residual + mlp(x)
    hidden = _linear(x.reshape(-1, x.shape[-1]), mlp.lin1.weight, mlp.lin1.bias, gelu=True)
    res = residual.reshape(hidden.shape[0], -1)
    return _linear(hidden, mlp.lin2.weight, mlp.lin2.bias, residual=res).view(x.shape)


def encode_image(encoder: modeling.ImageEncoderViT, x: Tensor) -> Tensor:
    """``ImageEncoderViT.forward`` with fused attention and linears, equal up to rounding.

    x: (1, 3, S, S) float32, normalised and padded -> (1, C, S/16, S/16) float32.
    """
    x = encoder.patch_embed(x)
    x = x + encoder.pos_embed if encoder.pos_embed is not None else x
    for blk in encoder.blocks:
        if blk.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, pad_hw = vit.window_partition(blk.norm1(x), blk.window_size)
            windows = _vit_attention(blk.attn, windows, None)
            x = x + vit.window_unpartition(windows, blk.window_size, pad_hw, hw)
        else:
            x = _vit_attention(blk.attn, blk.norm1(x), x)
        x = _vit_mlp(blk.mlp, blk.norm2(x), x)
    return encoder.neck(x.permute(0, 3, 1, 2))


# Decoder attention (TwoWayTransformer): q/k/v project C -> Ci = nh * d, out_proj Ci -> C. The
# image side has N = 64 * 64 tokens, the prompt side T = 7 (iou, 4 mask tokens, point, padding).


def _heads(x: Tensor, nh: int) -> Tensor:
    """(B, T, Ci) -> (B, nh, T, d)."""
    return x.reshape(*x.shape[:2], nh, -1).transpose(1, 2)


def _t2i_shared(attn: two_way.Attention, q_tok: Tensor, k_img: Tensor, v_img: Tensor) -> Tensor:
    """Tokens (B, T, C) attend to image keys/values (N, Ci) projected once -> (B, T, C)."""
    (b, t, _), nh, n = q_tok.shape, attn.num_heads, k_img.shape[0]
    q = _heads(attn.q_proj(q_tok), nh).transpose(0, 1).reshape(nh, b * t, -1)
    d = q.shape[-1]
    scores = (q / math.sqrt(d)) @ k_img.view(n, nh, d).permute(1, 2, 0)  # (nh, B*T, N)
    out = torch.softmax(scores, dim=-1) @ v_img.view(n, nh, d).transpose(0, 1)
    return attn.out_proj(out.view(nh, b, t, d).permute(1, 2, 0, 3).reshape(b, t, nh * d))


def _t2i_folded(attn: two_way.Attention, q_tok: Tensor, x: Tensor, x_pe: Tensor) -> Tensor:
    """Tokens (B, T, C) attend to per-prompt image tokens x (B, N, C), x_pe = x + pe, unprojected.

    Scores are (q W_k) x_pe^T; q . b_k is constant along the softmax axis and dropped. Values:
    softmax(.) (x W_v^T + b_v) = (softmax(.) x) W_v^T + b_v as each row sums to 1.
    """
    (b, t, c), nh = q_tok.shape, attn.num_heads
    q = _heads(attn.q_proj(q_tok), nh)
    d = q.shape[-1]
    qk = (q @ attn.k_proj.weight.view(nh, d, c)).reshape(b, nh * t, c) / math.sqrt(d)
    px = (torch.softmax(qk @ x_pe.transpose(1, 2), dim=-1) @ x).view(b, nh, t, c)
    out = px @ attn.v_proj.weight.view(nh, d, c).transpose(1, 2) + attn.v_proj.bias.view(nh, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, nh * d))


def _i2t(attn: two_way.Attention, tok: Tensor, tok_pe: Tensor, x: Tensor, x_pe: Tensor | None,
         q_img: Tensor | None = None) -> Tensor:  # fmt: skip
    """Image tokens attend to the T prompt tokens: returns x + out_proj(attention), (B, N, C).

    Queries are ``q_img`` (N, Ci), projected once, or ``x_pe`` (B, N, C), with W_q folded into
    the token keys. out_proj and its bias are folded into the values (each head's weights sum to
    1), so the output is one (N, nh*T) x (nh*T, C) product added to x. Scores are (B, nh, T, N):
    a softmax over T = 7 along the last axis is ~6x slower than along axis -2.
    """
    (b, t, c), nh = tok.shape, attn.num_heads
    k = _heads(attn.k_proj(tok_pe), nh)  # (B, nh, T, d)
    d, n = k.shape[-1], x.shape[-2]
    k = k / math.sqrt(d)
    if q_img is not None:
        kt = k.transpose(0, 1).reshape(nh, b * t, d)
        scores = (kt @ q_img.view(n, nh, d).permute(1, 2, 0)).view(nh, b, t, n).transpose(0, 1)
    else:
        assert x_pe is not None
        kq = (k @ attn.q_proj.weight.view(nh, d, c)).reshape(b, nh * t, c)
        kb = (k * attn.q_proj.bias.view(1, nh, 1, d)).sum(-1).reshape(b, nh * t, 1)
        scores = torch.baddbmm(kb, kq, x_pe.transpose(1, 2)).view(b, nh, t, n)
    probs = torch.softmax(scores, dim=-2).reshape(b, nh * t, n)
    vo = _heads(attn.v_proj(tok), nh) @ attn.out_proj.weight.view(c, nh, d).permute(1, 2, 0)
    vo = (vo + attn.out_proj.bias / nh).reshape(b, nh * t, c)
    return torch.baddbmm(x, probs.transpose(1, 2), vo)


class ImageSide:
    """Prompt-independent decoder inputs of one image, (N, C): keys0 (embedding + no-mask
    embedding) and pe; (N, Ci): the first layer's projections k0, v0 and q0."""

    def __init__(self, sam: Sam, features: Tensor) -> None:
        self.hw = (int(features.shape[-2]), int(features.shape[-1]))
        no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(-1, 1, 1)
        self.keys0 = (features[0] + no_mask).flatten(1).T.contiguous()
        self.pe = sam.prompt_encoder.get_dense_pe()[0].flatten(1).T.contiguous()
        first = sam.mask_decoder.transformer.layers[0]
        self.k0 = first.cross_attn_token_to_image.k_proj(self.keys0 + self.pe)
        self.v0 = first.cross_attn_token_to_image.v_proj(self.keys0)
        self.q0 = first.cross_attn_image_to_token.q_proj(self.keys0 + self.pe)


def _run_transformer(tr: modeling.TwoWayTransformer, side: ImageSide, tokens: Tensor
                     ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``TwoWayTransformer.forward`` for B prompts of one image: tokens (B, T, C) -> queries
    (B, T, C) and keys (B, N, C)."""
    first, qpe = tr.layers[0], tokens
    q = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))  # skip_first_layer_pe
    q = first.norm2(q + _t2i_shared(first.cross_attn_token_to_image, q + qpe, side.k0, side.v0))
    q = first.norm3(q + first.mlp(q))
    keys = first.norm4(_i2t(first.cross_attn_image_to_token, q, q + qpe, side.keys0, None, side.q0))
    for layer in tr.layers[1:]:
        qq, x_pe = q + qpe, keys + side.pe
        q = layer.norm1(q + layer.self_attn(q=qq, k=qq, v=q))
        q = layer.norm2(q + _t2i_folded(layer.cross_attn_token_to_image, q + qpe, keys, x_pe))
        q = layer.norm3(q + layer.mlp(q))
        keys = layer.norm4(_i2t(layer.cross_attn_image_to_token, q, q + qpe, keys, x_pe))
    x_pe = keys + side.pe
    q = tr.norm_final_attn(q + _t2i_folded(tr.final_attn_token_to_image, q + qpe, keys, x_pe))
    return q, keys


def _upscale_masks(dec: modeling.MaskDecoder, keys: Tensor, mask_tokens: Tensor) -> Tensor:
    """Multimask low-res logits: keys (B, h*w, C) with h = w, mask tokens (B, 3, C) ->
    (B, 3, 4h, 4w) float32. ``output_upscaling`` channels-last: a stride-2 2x2 transposed conv
    is a (C -> 2*2*C') linear map, LayerNorm2d a layer_norm over the last axis."""
    conv1, norm, act1, conv2, _ = dec.output_upscaling  # act2: GELU, fused into _linear
    (b, n, c), h = keys.shape, math.isqrt(keys.shape[1])  # the embedding grid is square
    c1, c2 = conv1.weight.shape[1], conv2.weight.shape[1]
    w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # rows (2, 2, C1)
    x = _linear(keys.reshape(b * n, c), w1, conv1.bias.repeat(4)).view(-1, c1)
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
    x = _linear(x, w2, conv2.bias.repeat(4), gelu=True).view(b, 16 * n, c2)
    mlps = dec.output_hypernetworks_mlps[1:]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    masks = (hyper @ x.transpose(1, 2)).view(b, len(mlps), h, h, 2, 2, 2, 2)
    # (b, m, i, j, a, c, a2, c2) -> (b, m, i, a, a2, j, c, c2): row 4i+2a+a2, column 4j+2c+c2
    return masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, len(mlps), 4 * h, 4 * h)


def decode_masks(sam: Sam, side: ImageSide, sparse: Tensor, iou_thresh: float = 0.0
                 ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """SAM's mask decoder (multimask output) for B point prompts of one image.

    sparse: (B, 2, C) prompt embeddings. Returns the predicted IoU (B, 3) float32, ``rows``
    (K,) int64, the prompts with a mask whose predicted IoU is > ``iou_thresh`` (all if it is
    0), and their low-res logits (K, 3, 256, 256) float32.
    """
    dec = sam.mask_decoder
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
    q, keys = _run_transformer(dec.transformer, side, tokens)
    iou = dec.iou_prediction_head(q[:, 0])[:, 1:]
    rows = torch.arange(q.shape[0], device=q.device)
    if iou_thresh > 0:
        rows = rows[(iou > iou_thresh).any(dim=1)]
        keys, q = keys[rows], q[rows]
    return iou, rows, _upscale_masks(dec, keys, q[:, 2 : 1 + dec.num_mask_tokens])


def resize_matrix(n_low: int, n_model: int, n_valid: int, n_out: int) -> Tensor:
    """Stock's low-res -> output resize along one axis as an (n_out, n_low) float32 matrix.

    ``Sam.postprocess_masks`` resizes n_low -> n_model bilinearly, keeps the first n_valid
    (drops padding) and resizes to n_out; it is linear and separable, so ``M_h @ L @ M_w.T``
    gives its values without the (n_model, n_model) intermediate.
    """
    eye = torch.eye(n_low, dtype=torch.float32)[None]
    up = F.interpolate(eye, size=n_model, mode="linear", align_corners=False)[..., :n_valid]
    return F.interpolate(up, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


@dataclass(frozen=True)
class AmgOptions:
    """``SamAutomaticMaskGenerator``'s options (same names, defaults from params.yaml), plus
    ``use_original`` (run SAM on the original photo) and the fast paths, off only for benches."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    crop_n_layers: int = 0
    use_original: bool = False
    fast_encoder: bool = True
    fast_decoder: bool = True


class SamMaskGenerator:
    """``SamAutomaticMaskGenerator`` semantics, faster, returning a :class:`MaskSet`.

    A points_per_side^2 grid of point prompts with multimask output; masks with predicted IoU
    <= ``pred_iou_thresh`` or stability < ``stability_score_thresh`` are dropped (each filter
    only when its threshold is > 0), then box NMS; with ``min_mask_region_area`` > 0, holes and
    islands below it are removed and NMS redone. Masks are made at the output resolution and
    empty ones are dropped. ``crop_n_layers`` > 0 runs stock's generator.
    """

    def __init__(self, model: Sam, options: AmgOptions) -> None:
        self.model, self.opts = model, options
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self._matrices: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    @torch.inference_mode()
    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        """Masks of ``image`` (H, W, 3) uint8 at (H, W), sorted by area, largest first.

        With ``use_original`` and an ``original`` photo (any size), SAM sees the photo and the
        masks are resized to (H, W) from the low-res logits.
        """
        out_hw = (int(image.shape[0]), int(image.shape[1]))
        if self.opts.use_original and original is not None:
            from opensam.images import load_rgb

            image = load_rgb(original)
        if self.opts.crop_n_layers > 0:
            return self._generate_stock(image, out_hw)
        masks, iou, stab = self._predict(image, out_hw)
        return _to_mask_set(masks.cpu().numpy(), iou.cpu().numpy(), stab.cpu().numpy(), out_hw)

    def _embed(self, image: np.ndarray) -> Tensor:
        """Image encoder features (1, C, 64, 64) float32 of an (H, W, 3) uint8 image."""
        x = torch.as_tensor(self.transform.apply_image(image), device=self.model.device)
        x = self.model.preprocess(x.permute(2, 0, 1).contiguous()[None])
        encoder = self.model.image_encoder
        return encode_image(encoder, x) if self.opts.fast_encoder else encoder(x)

    def _resize_matrices(self, image_hw: tuple[int, int], out_hw: tuple[int, int]
                         ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(M_h (H, 256), M_w^T (256, W)) for an image of image_hw, cached."""
        key = (*image_hw, *out_hw)
        if key not in self._matrices:
            size = self.model.image_encoder.img_size
            in_hw = self.transform.get_preprocess_shape(*image_hw, size)
            mh, mw = (
                resize_matrix(size // 4, size, n, o) for n, o in zip(in_hw, out_hw, strict=True)
            )
            self._matrices[key] = (
                mh.to(self.model.device),
                mw.T.contiguous().to(self.model.device),
            )
        return self._matrices[key]

    def _predict(self, image: np.ndarray, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Kept masks (n, H, W) bool, predicted IoU (n,) and stability (n,) float32."""
        opts, image_hw = self.opts, (int(image.shape[0]), int(image.shape[1]))
        features = self._embed(image)
        side = ImageSide(self.model, features) if opts.fast_decoder else None
        grid = amg.build_point_grid(opts.points_per_side) * np.array(image_hw)[None, ::-1]
        coords = torch.as_tensor(
            self.transform.apply_coords(grid, image_hw), device=features.device
        )
        mats, batch = self._resize_matrices(image_hw, out_hw), opts.points_per_batch
        parts = [
            self._predict_batch(features, side, coords[s : s + batch], mats)
            for s in range(0, coords.shape[0], batch)
        ]
        masks, iou, stab, boxes = (torch.cat(t) for t in zip(*parts, strict=True))
        keep = nms(boxes.float(), iou, opts.box_nms_thresh)
        masks, iou, stab = masks[keep], iou[keep], stab[keep]
        if opts.min_mask_region_area > 0 and len(masks):
            masks, keep = _remove_small_regions(
                masks, opts.min_mask_region_area, opts.box_nms_thresh
            )
            iou, stab = iou[keep], stab[keep]
        return masks, iou, stab

    def _predict_batch(self, features: Tensor, side: ImageSide | None, coords: Tensor,
                       mats: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:  # fmt: skip
        """Prompts (B, 2) float64 in the model frame -> masks (K, H, W) bool, predicted IoU,
        stability (K,) float32 and boxes (K, 4) xyxy inclusive, filtered as in stock's
        ``_process_batch`` (empty masks dropped as well)."""
        labels = torch.ones((coords.shape[0], 1), dtype=torch.int, device=coords.device)
        sparse, dense = self.model.prompt_encoder((coords[:, None], labels), None, None)
        thresh = self.opts.pred_iou_thresh
        if side is not None:
            iou, rows, low = decode_masks(self.model, side, sparse, thresh)
            iou = iou[rows]
        else:
            pe = self.model.prompt_encoder.get_dense_pe()
            low, iou = self.model.mask_decoder(features, pe, sparse, dense, True)
        low, iou = low.flatten(0, 1), iou.flatten()
        if thresh > 0:
            low, iou = low[iou > thresh], iou[iou > thresh]
        logits = mats[0] @ low @ mats[1]
        cut = self.model.mask_threshold
        stab = amg.calculate_stability_score(logits, cut, STABILITY_SCORE_OFFSET)
        masks = logits > cut
        keep = masks.flatten(1).any(dim=1)
        if self.opts.stability_score_thresh > 0:
            keep &= stab >= self.opts.stability_score_thresh
        masks, iou, stab = masks[keep], iou[keep], stab[keep]
        return masks, iou, stab, amg.batched_mask_to_box(masks)

    def _generate_stock(self, image: np.ndarray, out_hw: tuple[int, int]) -> MaskSet:
        """Stock's generator (crop layers), masks resized to out_hw by nearest neighbour."""
        from segment_anything import SamAutomaticMaskGenerator

        opts, scale = self.opts, out_hw[0] * out_hw[1] / (image.shape[0] * image.shape[1])
        records = SamAutomaticMaskGenerator(
            self.model, opts.points_per_side, opts.points_per_batch, opts.pred_iou_thresh,
            opts.stability_score_thresh, STABILITY_SCORE_OFFSET, opts.box_nms_thresh,
            opts.crop_n_layers, min_mask_region_area=round(opts.min_mask_region_area / scale),
        ).generate(image)  # fmt: skip
        if not records:
            return MaskSet.empty(*out_hw)
        masks = torch.as_tensor(np.stack([r["segmentation"] for r in records]))[:, None].float()
        masks = F.interpolate(masks, size=out_hw, mode="nearest")[:, 0] > 0
        iou, stab = ([r[k] for r in records] for k in ("predicted_iou", "stability_score"))
        return _to_mask_set(masks.numpy(), np.array(iou), np.array(stab), out_hw)


def _remove_small_regions(masks: Tensor, min_area: int, box_nms_thresh: float
                          ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Stock's ``postprocess_small_regions`` on masks (K, H, W) bool: returns the new masks kept
    by the second NMS (unchanged masks preferred) and their indices (k,) into the input."""
    new, scores = [], []
    for mask in masks.cpu().numpy():
        mask, holes = amg.remove_small_regions(mask, min_area, mode="holes")
        mask, islands = amg.remove_small_regions(mask, min_area, mode="islands")
        new.append(torch.as_tensor(mask))
        scores.append(float(not (holes or islands)))
    out = torch.stack(new).to(masks.device)
    scores_t = torch.tensor(scores, device=masks.device)
    keep = nms(amg.batched_mask_to_box(out).float(), scores_t, max(box_nms_thresh, CROP_NMS_THRESH))
    return out[keep], keep


def _to_mask_set(masks: np.ndarray, iou: np.ndarray, stab: np.ndarray, out_hw: tuple[int, int]
                 ) -> MaskSet:  # fmt: skip
    """(n, H, W) bool masks in NMS order -> MaskSet sorted by area, largest first (stable), empty
    masks dropped, boxes in the store's convention (w, h = pixels spanned)."""
    area = masks.sum(axis=(1, 2))
    order = np.argsort(-area, kind="stable")
    order = order[area[order] > 0]
    if order.size == 0:
        return MaskSet.empty(*out_hw)
    masks = np.ascontiguousarray(masks[order])
    return MaskSet(masks, area[order].astype(np.int32), iou[order].astype(np.float32),
                   stab[order].astype(np.float32), boxes_xywh(masks))  # fmt: skip


def build_sam_generator(sam: SamParams, points_per_side: int, min_region_area: int,
                        image_size: int) -> SamMaskGenerator:  # fmt: skip
    """Load ``sam.model`` / ``sam.checkpoint`` on ``sam.device`` and wrap it in a generator
    for image_size x image_size prepared images (its resize matrices are built up front)."""
    if sam.input not in ("prepared", "original"):
        raise InputError(f"sam.input: expected prepared or original, got {sam.input!r}")
    if sam.points_per_batch < 1 or sam.crop_n_layers < 0:
        raise InputError("sam: points_per_batch must be >= 1 and crop_n_layers >= 0")
    model = load_sam(sam.model, sam.checkpoint, sam.device)
    gen = SamMaskGenerator(model, AmgOptions(
        points_per_side, sam.points_per_batch, sam.pred_iou_thresh, sam.stability_score_thresh,
        sam.box_nms_thresh, min_region_area, sam.crop_n_layers, sam.input == "original",
    ))  # fmt: skip
    gen._resize_matrices((image_size, image_size), (image_size, image_size))
    return gen
