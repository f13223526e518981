"""The fast paths of :class:`opensam.masks.sam.SamMaskGenerator`: SAM's compute kernels.

- encoder (:func:`encode_image`): the decomposed rel-pos bias goes to
  ``scaled_dot_product_attention`` (stock adds it to the (heads, 4096, 4096) map in two more
  passes), built a few query rows at a time in one reused buffer; GELU and residuals are
  applied in place after the GEMMs;
- decoder (:class:`ImageSide`, :func:`decode_masks`): the first layer's image side is the same
  for every prompt and is projected once; later projections of the per-prompt (4096, C) maps are
  folded into the 7 tokens; the upscaling head is two matmuls in channels-last form;
- post-processing (:func:`resize_matrix`): stock's 256 -> 1024 -> crop -> output bilinear chain
  as one matrix per axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything import modeling
from segment_anything.modeling import Sam
from segment_anything.modeling import image_encoder as vit
from segment_anything.modeling import transformer as two_way
from torch import Tensor

_BIAS_BYTES = 64 << 20  # rel-pos bias built per SDPA call (query rows x heads x keys), bytes


def _linear(
    x: Tensor, weight: Tensor, bias: Tensor, gelu: bool = False, residual: Tensor | None = None
) -> Tensor:
    """gelu(x @ weight.T + bias) or residual + x @ weight.T + bias; x (M, K), weight (N, K).

    ``F.linear`` (MKL's sgemm, as stock's ``nn.Linear``), then GELU or the residual in place: on
    an AVX2 CPU at one thread this is faster than oneDNN's fused epilogues (``mkldnn.
    _linear_pointwise``: bias + GELU 0.49 s vs 0.35 s for a (4096, 768) x (768, 3072) layer)."""
    out = F.linear(x, weight, bias)
    if gelu:
        out = torch.ops.aten.gelu_(out)
    return out if residual is None else out.add_(residual)


def _rel_pos_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_h: Tensor,
    rel_w: Tensor,
    hw: tuple[int, int],
    scale: float,
    out: Tensor,
) -> None:
    """SDPA of q, k, v (nh, N, d) with the decomposed rel-pos bias, written to out (N, nh, d).

    The bias is built a few query rows of the grid at a time into one reused buffer of at most
    ``_BIAS_BYTES`` (global attention's whole (nh, N, N) bias is 800 MB: a fresh allocation per
    block costs page faults, ~0.6 s per vit_b global block at one thread)."""
    (h, w), nh, n = hw, q.shape[0], q.shape[1]
    rows = max(1, min(h, _BIAS_BYTES // (nh * w * n * q.element_size())))
    buf = q.new_empty(nh, rows, w, h, w)
    for r in range(0, h, rows):
        qs = q[:, r * w : (r + rows) * w]
        rq = qs.reshape(nh, -1, w, qs.shape[-1])
        # contiguous: einsum returns permuted views, and a broadcast sum of those would
        # inherit their layout
        rh = torch.einsum("bhwc,hkc->bhwk", rq, rel_h[r : r + rows]).contiguous()
        rw = torch.einsum("bhwc,wkc->bhwk", rq, rel_w).contiguous()
        bias = torch.add(rh[..., :, None], rw[..., None, :], out=buf[:, : rq.shape[1]])
        sdpa = F.scaled_dot_product_attention(
            qs, k, v, attn_mask=bias.view(nh, qs.shape[1], n), scale=scale
        )
        out[r * w : (r + rows) * w] = sdpa.transpose(0, 1)


def _vit_attention(attn: vit.Attention, x: Tensor, residual: Tensor | None) -> Tensor:
    """ViT ``Attention.forward`` (+ residual) with the rel-pos bias given to SDPA, one window
    and a few query rows at a time: x (B, H, W, C) -> (B, H, W, C)."""
    (b, h, w, c), nh, n = x.shape, attn.num_heads, x.shape[1] * x.shape[2]
    qkv = _linear(x.reshape(b * n, c), attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.view(b, n, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, d)
    k, v = k.contiguous(), v.contiguous()
    out = x.new_empty(b, n, nh, q.shape[-1])
    if attn.use_rel_pos:
        rel_h, rel_w = (
            vit.get_rel_pos(s, s, t) for s, t in ((h, attn.rel_pos_h), (w, attn.rel_pos_w))
        )
        for i in range(b):
            _rel_pos_sdpa(q[i], k[i], v[i], rel_h, rel_w, (h, w), attn.scale, out[i])
    else:
        out.copy_(F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2))
    res = None if residual is None else residual.reshape(b * n, c)
    return _linear(out.view(b * n, c), attn.proj.weight, attn.proj.bias, residual=res).view(x.shape)


def _exact_gelu(act: torch.nn.Module) -> bool:
    """Whether ``act`` is ``nn.GELU()`` (erf form), which ``aten.gelu_`` computes in place."""
    return isinstance(act, torch.nn.GELU) and act.approximate == "none"


def _vit_mlp(mlp: modeling.common.MLPBlock, x: Tensor, residual: Tensor) -> Tensor:
    """residual + ``MLPBlock`` (x), exact GELU and residual in place on the GEMM outputs."""
    if not _exact_gelu(mlp.act):
        return residual + mlp(x)
    hidden = _linear(x.reshape(-1, x.shape[-1]), mlp.lin1.weight, mlp.lin1.bias, gelu=True)
    res = residual.reshape(hidden.shape[0], -1)
    return _linear(hidden, mlp.lin2.weight, mlp.lin2.bias, residual=res).view(x.shape)


def encode_image(encoder: modeling.ImageEncoderViT, x: Tensor) -> Tensor:
    """``ImageEncoderViT.forward`` with SDPA attention and in-place epilogues, equal up to
    rounding.

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


def _i2t(
    attn: two_way.Attention,
    tok: Tensor,
    tok_pe: Tensor,
    x: Tensor,
    x_pe: Tensor | None,
    q_img: Tensor | None = None,
) -> Tensor:
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


def _run_transformer(
    tr: modeling.TwoWayTransformer, side: ImageSide, tokens: Tensor
) -> tuple[Tensor, Tensor]:
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
    conv1, norm, act1, conv2, _ = dec.output_upscaling  # act2: GELU, in _linear
    (b, n, c), h = keys.shape, math.isqrt(keys.shape[1])  # the embedding grid is square
    c1, c2 = conv1.weight.shape[1], conv2.weight.shape[1]
    w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # rows (2, 2, C1)
    x = _linear(keys.reshape(b * n, c), w1, conv1.bias.repeat(4)).view(-1, c1)
    x = F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps)
    x = torch.ops.aten.gelu_(x) if _exact_gelu(act1) else act1(x)  # in place: no (16n, C1) copy
    w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
    x = _linear(x, w2, conv2.bias.repeat(4), gelu=True).view(b, 16 * n, c2)
    mlps = dec.output_hypernetworks_mlps[1:]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    masks = (hyper @ x.transpose(1, 2)).view(b, len(mlps), h, h, 2, 2, 2, 2)
    # (b, m, i, j, a, c, a2, c2) -> (b, m, i, a, a2, j, c, c2): row 4i+2a+a2, column 4j+2c+c2
    return masks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, len(mlps), 4 * h, 4 * h)


def decode_masks(
    sam: Sam, side: ImageSide, sparse: Tensor, iou_thresh: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
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
