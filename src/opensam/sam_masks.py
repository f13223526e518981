"""SAM loading (registry, checkpoint checks) and a faster automatic mask generator.

:class:`SamMaskGenerator` keeps segment-anything's ``SamAutomaticMaskGenerator`` semantics
(same point grid, predicted-IoU and stability filters, box NMS, ``min_mask_region_area``
post-processing) and returns masks at the prepared resolution. Where stock spends its time and
what we do instead (measured in ``bench/masks.py``):

- image encoder: the global-attention blocks build the (heads, 4096, 4096) attention map and add
  the decomposed relative-position terms to it in two extra passes; we hand the bias to
  ``scaled_dot_product_attention`` (fused softmax, no extra passes);
- mask decoder: the image embedding is repeated once per prompt and every projection of it is
  redone per prompt. The first layer's image side is the same for all prompts, so it is projected
  once; later projections are folded into the 7 tokens (``(q W_k) X^T`` instead of
  ``q (X W_k^T)^T``), which cuts the per-prompt work on (4096, 256) maps by ~4x;
- the upscaling head runs only for prompts with a mask that can pass ``pred_iou_thresh``;
- post-processing works at the output resolution: the stock chain 256 -> 1024 (bilinear) -> crop
  -> output size (bilinear) is linear and separable, so it is two small matrix products; masks
  stay boolean tensors (no RLE round trips).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
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
CROP_NMS_THRESH = 0.7  # stock's crop_nms_thresh default; also its small-region NMS floor
STABILITY_SCORE_OFFSET = 1.0  # stock default
_ENCODER_HEADS_PER_CHUNK = 4  # bounds the (heads, N, N) attention bias of global blocks


def build_sam_tiny() -> Sam:
    """A randomly initialised SAM with real geometry (1024 input, 64x64 embedding, 256x256
    low-res masks) and tiny widths: for tests and ``bench/masks.py --quick``."""
    dim = 32
    encoder = ImageEncoderViT(
        depth=2, embed_dim=64, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=(1,), window_size=14, out_chans=dim,
    )  # fmt: skip
    prompt = PromptEncoder(
        embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=4
    )
    transformer = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2)
    decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=transformer, transformer_dim=dim,
        iou_head_depth=3, iou_head_hidden_dim=32,
    )  # fmt: skip
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


SAM_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": sam_model_registry["vit_h"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_b": sam_model_registry["vit_b"],
    "tiny": build_sam_tiny,
}
# (encoder embed_dim, depth) -> name, to say which model a mismatching checkpoint is for
_SIGNATURES = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b", (64, 2): "tiny"}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``/``cuda`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"sam.device: expected auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"sam.device: {name} requested but CUDA is not available")
    return torch.device(name)


def _describe_state_dict(state: dict[str, Any]) -> str:
    """Name the SAM variant a state dict belongs to, or say it is not a SAM checkpoint."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(weight, Tensor):
        return "it is not a SAM state dict (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    name = _SIGNATURES.get((int(weight.shape[0]), depth))
    shape = f"embed_dim={weight.shape[0]}, depth={depth}"
    return f"it looks like {name} ({shape})" if name else f"unknown SAM variant ({shape})"


def _read_state_dict(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InputError(f"{path}: cannot read SAM checkpoint ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a SAM checkpoint (expected a state dict)")
    return state


def load_sam(model: str, checkpoint: str | Path | None, device: str = "auto") -> Sam:
    """Build SAM ``model`` (vit_h, vit_l, vit_b, tiny), load ``checkpoint`` and move to ``device``.

    ``checkpoint=None`` gives random weights (a warning is logged). Raises :class:`InputError`
    for an unknown model, a missing file (naming the official download), an unreadable file or a
    checkpoint of another SAM variant (naming the variant it looks like).
    """
    if model not in SAM_BUILDERS:
        raise InputError(f"sam.model: unknown SAM model {model!r} (known: {', '.join(SAM_BUILDERS)})")
    dev = resolve_device(device)
    sam = SAM_BUILDERS[model]()
    if checkpoint is None:
        log.warning("sam.checkpoint is null: SAM %s has random weights (tests/demo only)", model)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            name = SAM_CHECKPOINT_NAMES.get(model)
            hint = f"download {SAM_URL}{name}" if name else f"{model} has no official checkpoint"
            raise InputError(f"{path}: SAM checkpoint not found ({hint}, or set sam.checkpoint: null)")
        state = _read_state_dict(path)
        try:
            sam.load_state_dict(state)
        except RuntimeError:
            what = _describe_state_dict(state)
            raise InputError(f"{path}: not a sam.model={model} checkpoint; {what}") from None
        log.info("loaded SAM %s from %s", model, path)
    return sam.to(dev).eval()


# ---------------------------------------------------------------- image encoder (fused attention)


def _vit_attention(attn: torch.nn.Module, x: Tensor) -> Tensor:
    """segment_anything's ViT ``Attention.forward`` with the rel-pos bias given to SDPA.

    x: (B, H, W, C) float32 -> (B, H, W, C) float32.
    """
    b, h, w, _ = x.shape
    nh = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, d)
    d = q.shape[-1]
    rh = get_rel_pos(h, h, attn.rel_pos_h) if attn.use_rel_pos else None
    rw = get_rel_pos(w, w, attn.rel_pos_w) if attn.use_rel_pos else None
    outs = []
    for s in range(0, nh, _ENCODER_HEADS_PER_CHUNK):
        qs, ks, vs = (t[:, s : s + _ENCODER_HEADS_PER_CHUNK] for t in (q, k, v))
        bias = None
        if rh is not None and rw is not None:
            rq = qs.reshape(-1, h, w, d)
            rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
            rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*qs.shape[:3], h * w)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=attn.scale))
    out = torch.cat(outs, dim=1).view(b, nh, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def encode_image(encoder: ImageEncoderViT, x: Tensor) -> Tensor:
    """``ImageEncoderViT.forward`` with fused attention (same result up to float rounding).

    x: (1, 3, S, S) float32, normalised and padded -> (1, C, S/16, S/16) float32.
    """
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks:
        shortcut = x
        x = blk.norm1(x)
        if blk.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, pad_hw = window_partition(x, blk.window_size)
        x = _vit_attention(blk.attn, x)
        if blk.window_size > 0:
            x = window_unpartition(x, blk.window_size, pad_hw, hw)
        x = shortcut + x
        x = x + blk.mlp(blk.norm2(x))
    return encoder.neck(x.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- mask decoder (folded attention)
# TwoWayTransformer attention: q/k/v project C -> Ci = nh * d, out_proj Ci -> C. The image side
# has N = 64 * 64 tokens, the prompt side T = 7 (iou, 4 mask tokens, point, padding point).


def _split_heads(x: Tensor, nh: int) -> Tensor:
    """(B, T, Ci) -> (B, nh, T, d)."""
    b, t, c = x.shape
    return x.reshape(b, t, nh, c // nh).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, nh, T, d) -> (B, T, nh * d)."""
    b, nh, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, nh * d)


def _t2i_shared(attn: torch.nn.Module, q_tok: Tensor, k_img: Tensor, v_img: Tensor) -> Tensor:
    """Tokens attend to image keys/values projected once for all prompts.

    q_tok: (B, T, C); k_img, v_img: (N, Ci) -> (B, T, C).
    """
    nh, (b, t, _) = attn.num_heads, q_tok.shape
    q = _split_heads(attn.q_proj(q_tok), nh).transpose(0, 1).reshape(nh, b * t, -1)
    n, d = k_img.shape[0], q.shape[-1]
    scores = q @ k_img.view(n, nh, d).permute(1, 2, 0) / math.sqrt(d)  # (nh, B*T, N)
    out = torch.softmax(scores, dim=-1) @ v_img.view(n, nh, d).transpose(0, 1)
    return attn.out_proj(out.view(nh, b, t, d).permute(1, 2, 0, 3).reshape(b, t, nh * d))


def _t2i_folded(attn: torch.nn.Module, q_tok: Tensor, x: Tensor, x_pe: Tensor) -> Tensor:
    """Tokens attend to per-prompt image tokens without projecting them.

    (q W_k) x^T replaces q (x W_k^T)^T (q . b_k is constant along the softmax axis and dropped);
    softmax(.) (x W_v^T + b_v) = (softmax(.) x) W_v^T + b_v as the rows sum to 1.
    q_tok: (B, T, C); x, x_pe (= x + image pe): (B, N, C) -> (B, T, C).
    """
    nh, (b, t, c) = attn.num_heads, q_tok.shape
    q = _split_heads(attn.q_proj(q_tok), nh)
    d = q.shape[-1]
    qk = (q @ attn.k_proj.weight.view(nh, d, c)).reshape(b, nh * t, c) / math.sqrt(d)
    probs = torch.softmax(qk @ x_pe.transpose(1, 2), dim=-1)  # (B, nh*T, N)
    px = (probs @ x).view(b, nh, t, c)
    out = px @ attn.v_proj.weight.view(nh, d, c).transpose(1, 2) + attn.v_proj.bias.view(nh, 1, d)
    return attn.out_proj(_merge_heads(out))


def _i2t(attn: torch.nn.Module, k_tok: Tensor, v_tok: Tensor, x_pe: Tensor | None,
         q_img: Tensor | None = None) -> Tensor:  # fmt: skip
    """Image tokens attend to the T prompt tokens; returns out_proj(attention), (B, N, C).

    Queries are ``q_img`` (N, Ci), projected once, or ``x_pe`` (B, N, C) unprojected: then W_q is
    folded into the token keys. out_proj is folded into the values, so the (B, N, C) output is one
    (N, nh*T) x (nh*T, C) product per prompt. Scores are kept as (B, nh, T, N): a softmax over
    T = 7 along the last axis is ~6x slower than along axis -2.
    """
    nh, (b, t, c) = attn.num_heads, k_tok.shape
    k = _split_heads(attn.k_proj(k_tok), nh)  # (B, nh, T, d)
    d = k.shape[-1]
    if q_img is not None:
        n = q_img.shape[0]
        kt = k.transpose(0, 1).reshape(nh, b * t, d)
        scores = (kt @ q_img.view(n, nh, d).permute(1, 2, 0)).view(nh, b, t, n).transpose(0, 1)
    else:
        assert x_pe is not None
        n = x_pe.shape[1]
        kq = (k @ attn.q_proj.weight.view(nh, d, c)).reshape(b, nh * t, c)
        kb = (k * attn.q_proj.bias.view(1, nh, 1, d)).sum(-1).reshape(b, nh * t, 1)
        scores = torch.baddbmm(kb, kq, x_pe.transpose(1, 2)).view(b, nh, t, n)
    probs = torch.softmax(scores / math.sqrt(d), dim=-2).reshape(b, nh * t, n)
    v = _split_heads(attn.v_proj(v_tok), nh)
    vo = (v @ attn.out_proj.weight.view(c, nh, d).permute(1, 2, 0)).reshape(b, nh * t, c)
    return torch.baddbmm(attn.out_proj.bias, probs.transpose(1, 2), vo)


class _ImageSide:
    """Prompt-independent decoder inputs of one image: keys0 = embedding + no-mask embedding
    (N, C), pe (N, C), and the first layer's projections k0, v0, q0 (N, Ci)."""

    def __init__(self, sam: Sam, features: Tensor) -> None:
        pe_grid = sam.prompt_encoder.get_dense_pe()[0]
        self.hw = (int(features.shape[-2]), int(features.shape[-1]))
        no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(-1, 1, 1)
        self.keys0 = (features[0] + no_mask).flatten(1).T.contiguous()
        self.pe = pe_grid.flatten(1).T.contiguous()
        first = sam.mask_decoder.transformer.layers[0]
        self.k0 = first.cross_attn_token_to_image.k_proj(self.keys0 + self.pe)
        self.v0 = first.cross_attn_token_to_image.v_proj(self.keys0)
        self.q0 = first.cross_attn_image_to_token.q_proj(self.keys0 + self.pe)


def _run_transformer(tr: TwoWayTransformer, side: _ImageSide, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """TwoWayTransformer.forward for B prompts of one image: tokens (B, T, C) -> (queries
    (B, T, C), keys (B, N, C)). Layer 0's image side is shared; later layers are folded."""
    first, qpe = tr.layers[0], tokens
    q = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))  # skip_first_layer_pe
    q = first.norm2(q + _t2i_shared(first.cross_attn_token_to_image, q + qpe, side.k0, side.v0))
    q = first.norm3(q + first.mlp(q))
    att = first.cross_attn_image_to_token
    keys = first.norm4(side.keys0 + _i2t(att, q + qpe, q, None, q_img=side.q0))
    for layer in tr.layers[1:]:
        qq = q + qpe
        q = layer.norm1(q + layer.self_attn(q=qq, k=qq, v=q))
        x_pe = keys + side.pe
        q = layer.norm2(q + _t2i_folded(layer.cross_attn_token_to_image, q + qpe, keys, x_pe))
        q = layer.norm3(q + layer.mlp(q))
        keys = layer.norm4(keys + _i2t(layer.cross_attn_image_to_token, q + qpe, q, x_pe))
    x_pe = keys + side.pe
    q = tr.norm_final_attn(q + _t2i_folded(tr.final_attn_token_to_image, q + qpe, keys, x_pe))
    return q, keys


def _upscale_masks(dec: MaskDecoder, keys: Tensor, mask_tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """Low-res mask logits of the multimask outputs: keys (B, N, C), mask_tokens (B, 3, C) ->
    (B, 3, 4h, 4w) float32.

    ``dec.output_upscaling`` in channels-last form: a stride-2 2x2 transposed conv is a linear
    map C -> (2, 2, C'), so both are matmuls on the (B, h, w, C) keys, LayerNorm2d becomes
    ``F.layer_norm`` on the last axis, and only the 3-channel result is rearranged to (H, W).
    """
    conv1, norm, act1, conv2, act2 = dec.output_upscaling
    b, (h, w) = keys.shape[0], hw
    w1 = conv1.weight.permute(0, 2, 3, 1)  # (C, 2, 2, C1)
    x = (keys @ w1.flatten(1)).view(b, h, w, 2, 2, -1) + conv1.bias
    x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1)  # (C1, 2, 2, C2)
    x = act2((x @ w2.flatten(1)).view(b, h * w * 4, 4, -1) + conv2.bias).view(b, -1, w2.shape[-1])
    mlps = dec.output_hypernetworks_mlps[1:]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
    masks = (x @ hyper.transpose(1, 2)).view(b, h, w, 2, 2, 2, 2, len(mlps))
    # (b, i, j, a, c, a2, c2, m) -> (b, m, i, a, a2, j, c, c2): row 4i+2a+a2, column 4j+2c+c2
    return masks.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, len(mlps), 4 * h, 4 * w)


def decode_masks(sam: Sam, side: _ImageSide, sparse: Tensor, iou_thresh: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The mask decoder for B point prompts (multimask output).

    sparse: (B, 2, C) prompt-encoder embeddings. Returns ``rows`` (K,) int64, the prompts with a
    mask whose predicted IoU exceeds ``iou_thresh`` (all when it is 0), their low-res logits
    (K, 3, 256, 256) float32 and the predicted IoU of all prompts (B, 3) float32.
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
    masks = _upscale_masks(dec, keys, q[:, 2 : 1 + dec.num_mask_tokens], side.hw)
    return rows, masks, iou


# ---------------------------------------------------------------- automatic mask generator


def resize_matrix(n_low: int, n_model: int, n_valid: int, n_out: int) -> Tensor:
    """Stock's low-res -> output resize along one axis as a matrix, (n_out, n_low) float32.

    ``Sam.postprocess_masks`` resizes bilinearly n_low -> n_model, crops the first n_valid
    (padding) and resizes bilinearly to n_out; both steps are linear and separable, so
    ``M_h @ logits @ M_w.T`` gives the same values without the (n_model, n_model) intermediate.
    """
    eye = torch.eye(n_low, dtype=torch.float32)[None]
    up = F.interpolate(eye, size=n_model, mode="linear", align_corners=False)[..., :n_valid]
    return F.interpolate(up, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


class SamMaskGenerator:
    """segment-anything's automatic mask generator, faster, returning a :class:`MaskSet`.

    Same semantics as ``SamAutomaticMaskGenerator`` with ``crop_n_layers=0``: a
    points_per_side^2 grid of single-point prompts, multimask output, masks with predicted IoU
    <= ``pred_iou_thresh`` or stability < ``stability_score_thresh`` dropped (each filter only
    when its threshold is > 0), box NMS at ``box_nms_thresh``, then, when
    ``min_mask_region_area`` > 0, holes and islands below it removed and NMS redone. Masks are
    made at the output resolution; empty masks are dropped. ``crop_n_layers`` > 0 delegates to
    the stock generator. ``fast_encoder``/``fast_decoder`` = False use stock's modules (bench).
    """

    def __init__(self, model: Sam, points_per_side: int, *, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 box_nms_thresh: float = 0.7, min_mask_region_area: int = 0,
                 crop_n_layers: int = 0, use_original: bool = False, fast_encoder: bool = True,
                 fast_decoder: bool = True) -> None:  # fmt: skip
        self.model = model
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area
        self.crop_n_layers = crop_n_layers
        self.use_original = use_original
        self.fast_encoder, self.fast_decoder = fast_encoder, fast_decoder
        self.model_name = ""  # set by build_sam_generator, for the mask store's attrs
        self.checkpoint_sha256 = ""  # "" = random weights
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self._matrices: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    @torch.inference_mode()
    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        """Masks of ``image`` (H, W, 3) uint8 at (H, W), sorted by area, largest first.

        With ``use_original`` and an ``original`` photo, SAM sees the photo (any size) and the
        masks are resized to (H, W) from the low-res logits.
        """
        out_hw = (int(image.shape[0]), int(image.shape[1]))
        sam_image = image
        if self.use_original and original is not None:
            from opensam.images import load_rgb

            sam_image = load_rgb(original)
        if self.crop_n_layers > 0:
            return self._generate_stock(sam_image, out_hw)
        masks, iou, stab = self._generate_masks(sam_image, out_hw)
        return _to_mask_set(masks.cpu().numpy(), iou.cpu().numpy(), stab.cpu().numpy(), out_hw)

    def _embed(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """Image encoder features (1, C, 64, 64) and the resized input size (h, w)."""
        x = torch.as_tensor(self.transform.apply_image(image), device=self.model.device)
        x = self.model.preprocess(x.permute(2, 0, 1).contiguous()[None])
        encoder = self.model.image_encoder
        features = encode_image(encoder, x) if self.fast_encoder else encoder(x)
        h, w = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], encoder.img_size)
        return features, (h, w)

    def _resize_matrices(self, input_hw: tuple[int, int], low: int, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        key = (*input_hw, low, *out_hw)
        if key not in self._matrices:
            size = self.model.image_encoder.img_size
            mh = resize_matrix(low, size, input_hw[0], out_hw[0])
            mw = resize_matrix(low, size, input_hw[1], out_hw[1])
            self._matrices[key] = (mh.to(self.model.device), mw.T.contiguous().to(self.model.device))
        return self._matrices[key]

    def _point_prompts(self, image_hw: tuple[int, int]) -> Tensor:
        """Stock's grid in the model input frame, (pps^2, 2) float64 (x, y)."""
        points = build_point_grid(self.points_per_side) * np.array(image_hw)[None, ::-1]
        coords = self.transform.apply_coords(points, image_hw)
        return torch.as_tensor(coords, device=self.model.device)

    def _generate_masks(self, image: np.ndarray, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Kept masks (n, H, W) bool, predicted IoU (n,) and stability (n,), in NMS order."""
        features, input_hw = self._embed(image)
        side = _ImageSide(self.model, features) if self.fast_decoder else None
        coords = self._point_prompts((int(image.shape[0]), int(image.shape[1])))
        parts = []
        for start in range(0, coords.shape[0], self.points_per_batch):
            pts = coords[start : start + self.points_per_batch, None, :]
            labels = torch.ones(pts.shape[:2], dtype=torch.int, device=pts.device)
            sparse, dense = self.model.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
            if side is not None:
                rows, low, iou = decode_masks(self.model, side, sparse, self.pred_iou_thresh)
                iou = iou[rows]
            else:
                pe = self.model.prompt_encoder.get_dense_pe()
                low, iou = self.model.mask_decoder(features, pe, sparse, dense, True)
            mats = self._resize_matrices(input_hw, low.shape[-1], out_hw)
            parts.append(self._filter_batch(low, iou, mats))
        masks, iou, stab, boxes = (torch.cat(t) for t in zip(*parts))
        keep = nms(boxes.float(), iou, self.box_nms_thresh)
        masks, iou, stab = masks[keep], iou[keep], stab[keep]
        if self.min_mask_region_area > 0 and len(masks):
            masks, keep = _remove_small_regions(masks, self.min_mask_region_area, self.box_nms_thresh)
            iou, stab = iou[keep], stab[keep]
        return masks, iou, stab

    def _filter_batch(self, low: Tensor, iou: Tensor, mats: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        """Low-res logits (B, 3, h, w), IoU (B, 3) -> kept masks (K, H, W) bool, IoU, stability,
        boxes (K, 4) xyxy inclusive (stock's), filtered like stock's ``_process_batch``."""
        low, iou = low.flatten(0, 1), iou.flatten()
        if self.pred_iou_thresh > 0:
            keep = iou > self.pred_iou_thresh
            low, iou = low[keep], iou[keep]
        logits = mats[0] @ low @ mats[1]
        threshold = self.model.mask_threshold
        stab = calculate_stability_score(logits, threshold, STABILITY_SCORE_OFFSET)
        masks = logits > threshold
        keep = masks.flatten(1).any(dim=1)
        if self.stability_score_thresh > 0:
            keep &= stab >= self.stability_score_thresh
        masks, iou, stab = masks[keep], iou[keep], stab[keep]
        return masks, iou, stab, batched_mask_to_box(masks)

    def _generate_stock(self, image: np.ndarray, out_hw: tuple[int, int]) -> MaskSet:
        """crop_n_layers > 0: stock generator, masks resized to out_hw by nearest neighbour."""
        from segment_anything import SamAutomaticMaskGenerator

        scale = out_hw[0] * out_hw[1] / (image.shape[0] * image.shape[1])
        stock = SamAutomaticMaskGenerator(
            self.model, self.points_per_side, self.points_per_batch, self.pred_iou_thresh,
            self.stability_score_thresh, STABILITY_SCORE_OFFSET, self.box_nms_thresh,
            self.crop_n_layers, min_mask_region_area=round(self.min_mask_region_area / scale),
        )  # fmt: skip
        records = stock.generate(image)
        if not records:
            return MaskSet.empty(*out_hw)
        masks = torch.as_tensor(np.stack([r["segmentation"] for r in records]))
        if masks.shape[1:] != out_hw:
            masks = F.interpolate(masks[:, None].float(), size=out_hw, mode="nearest")[:, 0] > 0
        iou = np.array([r["predicted_iou"] for r in records], np.float32)
        stab = np.array([r["stability_score"] for r in records], np.float32)
        return _to_mask_set(masks.numpy(), iou, stab, out_hw)


def _remove_small_regions(masks: Tensor, min_area: int, box_nms_thresh: float) -> tuple[Tensor, Tensor]:
    """Stock's ``postprocess_small_regions`` on boolean masks (K, H, W): returns the new masks
    kept by the second NMS (unchanged masks preferred) and their indices into the input."""
    from segment_anything.utils.amg import remove_small_regions

    new, scores = [], []
    for mask in masks.cpu().numpy():
        mask, holes = remove_small_regions(mask, min_area, mode="holes")
        mask, islands = remove_small_regions(mask, min_area, mode="islands")
        new.append(torch.as_tensor(mask))
        scores.append(float(not (holes or islands)))
    out = torch.stack(new).to(masks.device)
    keep = nms(batched_mask_to_box(out).float(), torch.tensor(scores, device=masks.device),
               max(box_nms_thresh, CROP_NMS_THRESH))  # fmt: skip
    return out[keep], keep


def _to_mask_set(masks: np.ndarray, iou: np.ndarray, stab: np.ndarray, out_hw: tuple[int, int]) -> MaskSet:
    """(n, H, W) bool masks in NMS order -> MaskSet sorted by area, largest first (stable), empty
    masks dropped, boxes in the store's convention (w, h = pixels spanned)."""
    if masks.shape[0] == 0:
        return MaskSet.empty(*out_hw)
    area = masks.reshape(masks.shape[0], -1).sum(axis=1)
    order = np.argsort(-area, kind="stable")
    order = order[area[order] > 0]
    masks = np.ascontiguousarray(masks[order])
    return MaskSet(
        masks=masks, area=area[order].astype(np.int32), predicted_iou=iou[order].astype(np.float32),
        stability_score=stab[order].astype(np.float32), bbox=boxes_xywh(masks),
    )  # fmt: skip


def build_sam_generator(sam: SamParams, points_per_side: int, min_region_area: int,
                        image_size: int) -> SamMaskGenerator:  # fmt: skip
    """Load ``sam.model`` / ``sam.checkpoint`` on ``sam.device`` and wrap it in a generator.

    ``image_size`` is the prepared side: the resize matrices for it are built up front.
    The generator carries ``model_name`` and ``checkpoint_sha256`` ("" for random weights) for
    the mask store's attrs.
    """
    if sam.input not in ("prepared", "original"):
        raise InputError(f"sam.input: expected prepared or original, got {sam.input!r}")
    model = load_sam(sam.model, sam.checkpoint, sam.device)
    gen = SamMaskGenerator(
        model, points_per_side, points_per_batch=sam.points_per_batch,
        pred_iou_thresh=sam.pred_iou_thresh, stability_score_thresh=sam.stability_score_thresh,
        box_nms_thresh=sam.box_nms_thresh, min_mask_region_area=min_region_area,
        crop_n_layers=sam.crop_n_layers, use_original=sam.input == "original",
    )  # fmt: skip
    gen.model_name = sam.model
    gen.checkpoint_sha256 = file_sha256(sam.checkpoint) if sam.checkpoint else ""
    size = model.image_encoder.img_size
    gen._resize_matrices((size, size), size // 4, (image_size, image_size))
    return gen
