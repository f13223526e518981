"""The OpenSAM model: dense backbone (CLIP, DINO or both) + decoder + head (CLIP's fixed text
embeddings or a trained linear / MLP head) + mask aggregation, and its checkpoints (format in
docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from opensam.config import (
    BACKBONE_NAMES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ClipParams,
    DinoParams,
    ModelParams,
)
from opensam.errors import InputError, quote
from opensam.model.aggregation import (
    aggregate_head_log_probs,
    aggregate_log_probs,
    class_ids,
    prepare_mask_inputs,
)
from opensam.model.backbones import build_tower
from opensam.model.clip import (
    create_clip,
    create_visual,
    encode_prompts,
    get_tokenizer,
    image_mean_std,
)
from opensam.model.dino import create_dino, dino_mean_std
from opensam.model.heads import LinearHead, build_head
from opensam.parallel.context import current_runtime
from opensam.prepared import check_classes
from opensam.runtime import save_torch

log = logging.getLogger(__name__)
PROTOTYPE_LOGIT_SCALE = 1 / 0.07  # logit scale without CLIP: CLIP's initial temperature


class Decoder(nn.Module):
    """A decoder maps the tower's (B, D, h, w) grid to a (B, D, h', w') map whose *bilinear
    upsampling* to H×W is the dense embedding; :meth:`out_grid` reports (h', w'). The mask
    aggregation pools on that grid, so any decoder composes with exact NU."""

    def out_grid(self, grid_hw: tuple[int, int]) -> tuple[int, int]:
        """Output grid (h', w') for an input grid (h, w)."""
        return grid_hw


class UpsampleDecoder(Decoder):
    """The thesis's decoder ("NU"): bilinear upsampling to image size, no parameters.

    The map passes through unchanged: the upsampling is folded exactly into the aggregation
    (pool weights and per-pixel logits on the (h, w) grid, see :mod:`opensam.model.aggregation`).
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) → (B, D, h, w), unchanged."""
        return emb


DECODERS: dict[str, Callable[[int], Decoder]] = {"upsample": UpsampleDecoder}


def build_decoder(name: str, embed_dim: int) -> Decoder:
    """Decoder from :data:`DECODERS` by name (``clip.decoder`` in params)."""
    if name not in DECODERS:
        raise InputError(f"clip.decoder '{name}': unknown decoder (known: {', '.join(DECODERS)})")
    return DECODERS[name](embed_dim)


class OpenSamModel(nn.Module):
    """Dense backbone → decoder → L2-normalised embeddings → head → class log-probabilities.

    Buffers: ``text_embeddings`` (C, D) float32, the class embeddings: CLIP's prompt embeddings
    (zero-padded over DINO channels for ``clip+dino``) or class prototypes (``dino``); the text
    head classifies with them, trained heads start from them; ``logit_scale`` () float32 (the
    CLIP model's ``exp(logit_scale)``, fixed; :data:`PROTOTYPE_LOGIT_SCALE` without CLIP);
    ``mean``/``std`` (3,) the backbone's image normalisation. ``head`` None is the text head.
    ``freeze_backbone``: the tower gets no gradient, runs without autograd and stays in eval
    mode. ``spec`` is what the checkpoint records to rebuild it (``model`` and ``dino`` params).
    """

    text_embeddings: torch.Tensor
    logit_scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        tower: nn.Module,
        decoder: Decoder,
        text_embeddings: torch.Tensor,
        logit_scale: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        head: LinearHead | None = None,
        spec: ModelParams | None = None,
        dino: DinoParams | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.decoder = decoder
        self.head = head
        self.spec = spec if spec is not None else ModelParams()
        self.dino_spec = dino if dino is not None else DinoParams()
        self.freeze_backbone = self.spec.freeze_backbone
        if self.freeze_backbone:
            self.tower.requires_grad_(False)
            self.tower.eval()
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def train(self, mode: bool = True) -> OpenSamModel:
        """As ``nn.Module.train``; a frozen backbone stays in eval mode (no drop path)."""
        super().train(mode)
        if self.freeze_backbone:
            self.tower.eval()
        return self

    def set_class_embeddings(self, class_emb: torch.Tensor) -> None:
        """Store (C, D) class embeddings and start a trained head from them (``W = scale · E``;
        √2 more for ``clip+dino``, whose two unit-norm parts each carry 1/√2 of an embedding)."""
        if tuple(class_emb.shape) != tuple(self.text_embeddings.shape):
            raise ValueError(
                f"class embeddings {tuple(class_emb.shape)}, expected "
                f"{tuple(self.text_embeddings.shape)}"
            )
        self.text_embeddings.copy_(class_emb.detach().float())
        if self.head is not None:
            parts = len(self.spec.backbone.split("+"))
            self.head.init_from(class_emb.float(), float(self.logit_scale) * math.sqrt(parts))

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        """Grid (h, w) of :meth:`embed` for a square ``image_size`` input (pool weights' grid)."""
        tower_grid = cast(Any, self.tower).grid_hw((image_size, image_size))
        return self.decoder.out_grid(tower_grid)

    def embed(
        self,
        images: torch.Tensor,
        feature_dropout: float = 0.0,
        channel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] → (B, D, h, w) float, L2-normalised per location.

        ``feature_dropout`` > 0 zeroes whole channels of the embedding with that rate before
        the normalisation, in training and eval mode alike (the online student's
        feature-perturbed view, UniMatch's feature perturbation). ``channel_mask`` (B, D), 1 to
        keep a channel and 0 to drop it, does the same with a given mask (UniMatch V2's
        complementary dropout: two views, one mask and its complement); no rescaling is needed,
        since the map is L2-normalised after it."""
        x = (images.to(self.mean.device, non_blocking=True) - self.mean) / self.std
        with current_runtime().autocast():  # bf16 / fp16 on CUDA only (runtime.precision)
            if self.freeze_backbone:
                with torch.no_grad():
                    feats = self.tower(x)
            else:
                feats = self.tower(x)
            emb = self.decoder(feats)
        emb = emb.float()  # the dropout and the aggregation run in fp32
        if feature_dropout > 0:
            emb = nn.functional.dropout2d(emb, feature_dropout, training=True)
        if channel_mask is not None:
            emb = emb * channel_mask.to(emb)[:, :, None, None]
        return nn.functional.normalize(emb, dim=1)

    def log_probs(
        self,
        emb: torch.Tensor,
        out_hw: tuple[int, int],
        pool_weights: torch.Tensor | None = None,
        winner: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class log-probabilities (B, C, H, W) from :meth:`embed`'s output (B, D, h, w), e.g. to
        score several mask sets on one embedding; arguments as in :meth:`forward`."""
        text, scale, dev = self.text_embeddings, self.logit_scale, emb.device
        pool_weights = None if pool_weights is None else pool_weights.to(dev, non_blocking=True)
        winner = None if winner is None else winner.to(dev, non_blocking=True)
        with torch.autocast(dev.type, enabled=False):  # the aggregation stays in fp32
            if self.head is not None:
                return aggregate_head_log_probs(
                    emb.float(), self.head, pool_weights, winner, out_hw
                )
            return aggregate_log_probs(emb.float(), text, scale, pool_weights, winner, out_hw)

    @torch.no_grad()
    def embed_many(self, images: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
        """:meth:`embed` of N (3, H, W) float images in batches (progress bar) → (N, D, h, w)."""
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch"):
            out.append(self.embed(torch.stack(list(images[start : start + batch_size]))))
        return torch.cat(out)

    @torch.no_grad()
    def predict_embedding(
        self,
        emb: torch.Tensor,
        out_hw: tuple[int, int],
        masks: torch.Tensor | np.ndarray | None = None,
        variant: str = "nu",
    ) -> torch.Tensor:
        """Class ids (H, W) int64 of one image from its embedding (D, h, w) and its masks
        ((M, H, W) bool, largest first; None: per-pixel prediction only)."""
        pool = winner = None
        if masks is not None:
            inputs = prepare_mask_inputs(masks, (emb.shape[-2], emb.shape[-1]), variant)
            pool, winner = inputs.pool_weights[None], inputs.winner[None]
        return class_ids(self.log_probs(emb[None], out_hw, pool, winner)[0], dim=0)

    def forward(
        self,
        images: torch.Tensor,
        pool_weights: torch.Tensor | None = None,
        winner: torch.Tensor | None = None,
        feature_dropout: float = 0.0,
        channel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1]; pool_weights (B, M, h, w) float32 and winner
        (B, H, W) int64 (see :func:`opensam.model.aggregation.prepare_mask_inputs`) or None →
        (B, C, H, W) log-probabilities; ``feature_dropout`` and ``channel_mask`` as in
        :meth:`embed`."""
        out_hw = (images.shape[-2], images.shape[-1])
        emb = self.embed(images, feature_dropout, channel_mask)
        return self.log_probs(emb, out_hw, pool_weights, winner)


def _assemble(
    tower: nn.Module,
    clip: ClipParams,
    spec: ModelParams,
    dino: DinoParams,
    class_emb: torch.Tensor,
    scale: float,
    norm: tuple[tuple[float, ...], tuple[float, ...]],
) -> OpenSamModel:
    embed_dim = int(cast(Any, tower).embed_dim)
    decoder = build_decoder(clip.decoder, embed_dim)
    if class_emb.shape[1] != embed_dim:
        raise InputError(f"text embeddings have D={class_emb.shape[1]}, image tower D={embed_dim}")
    head = build_head(spec.resolved_head(), embed_dim, class_emb.shape[0], spec.mlp_hidden)
    return OpenSamModel(tower, decoder, class_emb, scale, norm[0], norm[1], head, spec, dino)


def _build_tower(
    spec: ModelParams, clip_visual: nn.Module | None, vit: nn.Module | None, clip_norm: Any
) -> nn.Module:
    dino_norm = dino_mean_std(vit) if vit is not None else None
    try:
        return build_tower(spec.backbone, clip_visual, vit, clip_norm, dino_norm)
    except ValueError as exc:
        raise InputError(f"model.backbone {spec.backbone}: {exc}") from None


def build_model(
    clip: ClipParams,
    prompts: list[str],
    drop_path: float = 0.0,
    spec: ModelParams | None = None,
    dino: DinoParams | None = None,
) -> OpenSamModel:
    """A fresh model from pretrained weights (``clip.pretrained``, ``dino.pretrained``) for the
    backbone and head of ``spec`` (default: CLIP with its text head, the thesis's model).

    With CLIP, its text tower encodes ``prompts`` once (C = len(prompts)) and is then dropped;
    a trained head starts from those embeddings when ``head_init`` resolves to ``text``. With
    ``prototypes`` the caller computes them (:func:`opensam.model.heads.class_prototypes`) and
    calls :meth:`OpenSamModel.set_class_embeddings`; until then the class embeddings are zero.
    """
    spec = spec if spec is not None else ModelParams()
    dino = dino if dino is not None else DinoParams()
    visual = vit = None
    text = torch.zeros(len(prompts), 0)
    scale, norm = PROTOTYPE_LOGIT_SCALE, None
    if spec.has_clip:
        clip_model = cast(Any, create_clip(clip.model, clip.pretrained, drop_path))
        text = encode_prompts(clip_model, get_tokenizer(clip.model), prompts, clip.templates)
        scale = float(clip_model.logit_scale.detach().exp())
        norm = image_mean_std(clip_model)
        visual = clip_model.visual
    if spec.has_dino:
        vit = create_dino(dino.model, dino.pretrained)
        norm = norm if norm is not None else dino_mean_std(vit)
    tower = _build_tower(spec, visual, vit, image_mean_std_or(norm))
    embed_dim = int(cast(Any, tower).embed_dim)
    class_emb = torch.zeros(len(prompts), embed_dim)
    class_emb[:, : text.shape[1]] = text
    model = _assemble(tower, clip, spec, dino, class_emb, scale, image_mean_std_or(norm))
    if spec.resolved_init() == "text" and spec.has_clip:
        model.set_class_embeddings(class_emb)
    return model.to(current_runtime().device).eval()  # runtime.device (the CPU by default)


def image_mean_std_or(
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``norm``, or the identity normalisation (rebuilt models load theirs from the weights)."""
    return norm if norm is not None else ((0.0,) * 3, (1.0,) * 3)


def embedding_channels(model: nn.Module) -> int:
    """D of :meth:`OpenSamModel.embed`'s (B, D, h, w) map (``model`` or its DDP wrapper)."""
    inner = cast(Any, getattr(model, "module", model))
    return int(inner.decoder.embed_dim)


def forward_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    use_masks: bool,
    feature_dropout: float = 0.0,
    channel_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one forward pass of a loader batch: (B, C, H, W) log-probabilities on the model's
    device (autograd as the caller sets it); SAM aggregation when ``use_masks``, else the
    per-pixel prediction (``pool_weights=None``); ``feature_dropout`` > 0 and ``channel_mask``
    are passed on to the model (:meth:`OpenSamModel.embed`)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    images = batch["image"].to(device)
    pool = batch["pool_weights"].to(device) if use_masks else None
    winner = batch["winner"].to(device) if use_masks else None
    extra: dict[str, Any] = {"feature_dropout": feature_dropout} if feature_dropout > 0 else {}
    if channel_mask is not None:
        extra["channel_mask"] = channel_mask.to(device)
    return cast(torch.Tensor, model(images, pool_weights=pool, winner=winner, **extra))


def save_checkpoint(
    path: str | Path,
    model: OpenSamModel,
    classes: list[str],
    clip: ClipParams,
    image_size: int,
    **extra: Any,
) -> None:
    """Write a checkpoint dict atomically: ``state_dict``, ``clip``, ``classes``, ``image_size``,
    ``text_embeddings`` (C, D) float32, ``model`` (backbone and head) and ``dino`` (the DINO
    ViT's name) so :func:`load_checkpoint` rebuilds the architecture, ``epoch``, ``val_miou``
    (None unless given), plus ``extra``."""
    ckpt: dict[str, Any] = {"epoch": None, "val_miou": None}
    ckpt.update(extra)
    ckpt.update(
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        clip=dataclasses.asdict(clip),
        model=dataclasses.asdict(model.spec),
        dino=dataclasses.asdict(model.dino_spec),
        classes=list(classes),
        image_size=int(image_size),
        text_embeddings=model.text_embeddings.detach().cpu().float().clone(),
    )
    save_torch(ckpt, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or foreign pickle
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    required = ("state_dict", "clip", "classes", "image_size", "text_embeddings")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path}: not an OpenSAM checkpoint (missing {', '.join(missing)})")
    return dict(ckpt)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata (everything but ``state_dict``), without building the model."""
    ckpt = _read_checkpoint(Path(path))
    ckpt.pop("state_dict")
    return ckpt


def checkpoint_clip(meta: dict[str, Any], path: str | Path) -> ClipParams:
    """The :class:`ClipParams` recorded in a checkpoint's metadata."""
    try:
        return ClipParams(**meta["clip"])
    except TypeError as exc:
        raise InputError(f"{path}: bad 'clip' entry ({exc})") from None


def checkpoint_backbone(meta: dict[str, Any], path: str | Path) -> tuple[ModelParams, DinoParams]:
    """The backbone and head (:class:`ModelParams`, :class:`DinoParams`) a checkpoint records;
    checkpoints from before backbones were selectable hold CLIP with its text head."""
    try:
        spec = ModelParams(**meta.get("model", {"backbone": "clip", "head": "text"}))
        dino = DinoParams(**meta.get("dino", {}))
    except TypeError as exc:
        raise InputError(f"{path}: bad 'model' or 'dino' entry ({exc})") from None
    if spec.backbone not in BACKBONE_NAMES or spec.resolved_head() not in ("text", "linear", "mlp"):
        raise InputError(f"{path}: bad 'model' entry {quote(meta.get('model'))}")
    return spec, dino


def _check_checkpoint_fields(path: Path, ckpt: dict[str, Any]) -> None:
    """One-line errors for a crafted checkpoint's metadata, before any model is built."""
    classes, size, text = ckpt["classes"], ckpt["image_size"], ckpt["text_embeddings"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{path}: bad 'classes' entry (expected a list of class names)")
    ok = isinstance(size, int) and not isinstance(size, bool)
    if not ok or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        expected = f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        raise InputError(f"{path}: bad 'image_size' {quote(size)} (expected {expected})")
    if not isinstance(text, torch.Tensor) or text.ndim != 2 or not text.is_floating_point():
        raise InputError(f"{path}: bad 'text_embeddings' (expected a (classes, D) float tensor)")
    if text.shape[0] != len(classes) or not bool(torch.isfinite(text).all()):
        raise InputError(
            f"{path}: bad 'text_embeddings' {tuple(text.shape)} for {len(classes)} classes"
        )
    if not isinstance(ckpt["clip"], dict):
        raise InputError(f"{path}: bad 'clip' entry (expected a mapping)")
    _check_optional_fields(path, ckpt, len(classes))


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_optional_fields(path: Path, ckpt: Mapping[str, Any], n_classes: int) -> None:
    """The metadata predict reads besides the weights: the training masks and colours."""
    masks = ckpt.get("masks")
    if masks is not None:
        ok = isinstance(masks, dict) and isinstance(masks.get("generator", ""), str)
        ok = ok and _is_int(masks.get("pps", 1), 1, 128)
        ok = ok and _is_int(masks.get("min_region_area", 0), 0, 2**31)
        if not ok:
            raise InputError(f"{path}: bad 'masks' entry {quote(masks)}")
    colors = ckpt.get("labelmap_colors")
    if colors:  # None or [] = not recorded
        ok = isinstance(colors, list) and len(colors) >= n_classes
        ok = ok and all(
            isinstance(c, list | tuple) and len(c) == 3 and all(_is_int(v, 0, 255) for v in c)
            for c in colors
        )
        if not ok:
            raise InputError(f"{path}: bad 'labelmap_colors' entry {quote(colors)}")


def load_checkpoint(
    path: str | Path,
    expected_classes: Sequence[str] | None = None,
    drop_path: float = 0.0,
    classes_from: str = "params.yaml",
) -> tuple[OpenSamModel, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint` (no CLIP weights or text tower needed).

    Returns (model in eval mode, the checkpoint dict without ``state_dict``). Raises
    :class:`InputError` if the classes differ from ``expected_classes`` (read from
    ``classes_from``) or the weights don't fit.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path)
    _check_checkpoint_fields(path, ckpt)
    if expected_classes is not None:
        check_classes(list(ckpt["classes"]), expected_classes, str(path), classes_from)
    clip = checkpoint_clip(ckpt, path)
    spec, dino = checkpoint_backbone(ckpt, path)
    state = ckpt.pop("state_dict")
    text = ckpt["text_embeddings"]
    try:
        visual = create_visual(clip.model, drop_path) if spec.has_clip else None
        vit = create_dino(dino.model, None) if spec.has_dino else None
        identity = image_mean_std_or(None)
        tower = _build_tower(spec, visual, vit, identity)
        model = _assemble(tower, clip, spec, dino, text, 1.0, identity)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = clip.model if spec.backbone == "clip" else f"{spec.backbone} ({dino.model})"
        raise InputError(f"{path}: weights do not fit {what} ({first[:200]})") from None
    weights = model.state_dict().items()
    bad = [k for k, v in weights if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise InputError(f"{path}: weights hold NaN or infinite values ({quote(bad[0])}, ...)")
    return model.to(current_runtime().device).eval(), ckpt
