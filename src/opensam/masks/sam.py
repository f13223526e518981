"""SAM loading (registry, checkpoint checks) and a faster automatic mask generator.

:class:`SamMaskGenerator` keeps ``SamAutomaticMaskGenerator``'s semantics and returns masks at
the prepared resolution. What it does instead of stock (each measured in ``bench/masks.py``):

- encoder: the decomposed rel-pos bias goes to ``scaled_dot_product_attention`` (stock adds it
  to the (heads, 4096, 4096) map in two more passes), built a few query rows at a time in one
  reused buffer; GELU and residuals are applied in place after the GEMMs;
- decoder: the first layer's image side is the same for every prompt and is projected once;
  later projections of the per-prompt (4096, C) maps are folded into the 7 tokens
  (``(q W_k) x^T`` for ``q (x W_k^T)^T``); the upscaling head is two matmuls in channels-last
  form, and runs only for prompts with a mask that can pass ``pred_iou_thresh``; prompts are
  decoded ``PROMPTS_PER_DECODE`` at a time, so that no per-prompt map is a fresh mmap;
- post-processing: stock's 256 -> 1024 -> crop -> output bilinear chain is linear and separable,
  so it is two small matrix products; masks stay boolean tensors (no RLE round trips).

The encoder/decoder kernels live in :mod:`opensam.masks.sam_kernels` (re-exported here).
"""

from __future__ import annotations

import hashlib
import logging
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
from segment_anything.utils import amg
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torchvision.ops import nms

from opensam.config import SamParams
from opensam.errors import InputError
from opensam.masks.arrays import MaskSet, mask_set_from_arrays
from opensam.masks.sam_kernels import ImageSide, decode_masks, encode_image, resize_matrix

log = logging.getLogger(__name__)

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINT_NAMES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
CROP_NMS_THRESH = 0.7  # stock's crop_nms_thresh default, also its small-region NMS floor
STABILITY_SCORE_OFFSET = 1.0  # stock's default
# Prompts decoded at once, whatever points_per_batch (results are per prompt): per prompt the
# decoder's maps are 4 MB (keys) to 8 MB (upscaling); at 64 prompts each is a fresh mmap of
# 0.25-0.5 GB whose page faults cost as much system time as the decoder's arithmetic (vit_b,
# one thread, 256 prompts: 25.6 s at 64, 16.9 s at 4, 15.3 s at 2, 16.6 s at 1). CPU only: on a
# GPU the batch of points_per_batch prompts is decoded at once.
PROMPTS_PER_DECODE = 2


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
        depth=2,
        embed_dim=64,
        img_size=1024,
        mlp_ratio=2,
        num_heads=2,
        patch_size=16,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=14,
        out_chans=dim,
    )
    prompt = modeling.PromptEncoder(
        embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=4
    )
    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
    )
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


def sam_download_hint(model: str) -> str:
    """Where to get the official checkpoint of SAM ``model`` (for a not-found error)."""
    name = SAM_CHECKPOINT_NAMES.get(model)
    if name is None:
        return f"sam.model {model} has no official checkpoint; choose vit_h, vit_l or vit_b"
    return f"download {SAM_URL}{name} (sam.model {model}) and put it at this path"


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
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: SAM checkpoint not found ({sam_download_hint(model)})")
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
        masks_np, iou_np, stab_np = (t.cpu().numpy() for t in (masks, iou, stab))
        return mask_set_from_arrays(masks_np, iou_np, stab_np, out_hw)

    def _embed(self, image: np.ndarray) -> Tensor:
        """Image encoder features (1, C, 64, 64) float32 of an (H, W, 3) uint8 image."""
        x = torch.as_tensor(self.transform.apply_image(image), device=self.model.device)
        x = self.model.preprocess(x.permute(2, 0, 1).contiguous()[None])
        encoder = self.model.image_encoder
        return encode_image(encoder, x) if self.opts.fast_encoder else encoder(x)

    def _resize_matrices(
        self, image_hw: tuple[int, int], out_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
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
        mats = self._resize_matrices(image_hw, out_hw)
        small = features.device.type == "cpu"  # a GPU wants the whole batch in one launch
        batch = min(opts.points_per_batch, PROMPTS_PER_DECODE) if small else opts.points_per_batch
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

    def _predict_batch(
        self, features: Tensor, side: ImageSide | None, coords: Tensor, mats: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, ...]:
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
            self.model,
            opts.points_per_side,
            opts.points_per_batch,
            opts.pred_iou_thresh,
            opts.stability_score_thresh,
            STABILITY_SCORE_OFFSET,
            opts.box_nms_thresh,
            opts.crop_n_layers,
            min_mask_region_area=round(opts.min_mask_region_area / scale),
        ).generate(image)
        if not records:
            return MaskSet.empty(*out_hw)
        masks = torch.as_tensor(np.stack([r["segmentation"] for r in records]))[:, None].float()
        masks = F.interpolate(masks, size=out_hw, mode="nearest")[:, 0] > 0
        iou, stab = ([r[k] for r in records] for k in ("predicted_iou", "stability_score"))
        return mask_set_from_arrays(masks.numpy(), np.array(iou), np.array(stab), out_hw)


def _remove_small_regions(
    masks: Tensor, min_area: int, box_nms_thresh: float
) -> tuple[Tensor, Tensor]:
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


def build_sam_generator(
    sam: SamParams, points_per_side: int, min_region_area: int, image_size: int
) -> SamMaskGenerator:
    """Load ``sam.model`` / ``sam.checkpoint`` on ``sam.device`` and wrap it in a generator
    for image_size x image_size prepared images (its resize matrices are built up front)."""
    if sam.input not in ("prepared", "original"):
        raise InputError(f"sam.input: expected prepared or original, got {sam.input!r}")
    if sam.points_per_batch < 1 or sam.crop_n_layers < 0:
        raise InputError("sam: points_per_batch must be >= 1 and crop_n_layers >= 0")
    model = load_sam(sam.model, sam.checkpoint, sam.device)
    gen = SamMaskGenerator(
        model,
        AmgOptions(
            points_per_side,
            sam.points_per_batch,
            sam.pred_iou_thresh,
            sam.stability_score_thresh,
            sam.box_nms_thresh,
            min_region_area,
            sam.crop_n_layers,
            sam.input == "original",
        ),
    )
    gen._resize_matrices((image_size, image_size), (image_size, image_size))
    return gen
