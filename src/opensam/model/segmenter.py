"""The OpenSAM model: dense CLIP image tower + decoder + fixed text embeddings + mask aggregation,
and its checkpoints (format in docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from opensam.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ClipParams
from opensam.errors import InputError, quote
from opensam.model.aggregation import aggregate_log_probs, class_ids, prepare_mask_inputs
from opensam.model.clip import (
    DenseImageTower,
    create_clip,
    create_visual,
    encode_prompts,
    get_tokenizer,
    image_mean_std,
)
from opensam.parallel.context import current_runtime
from opensam.prepared import check_classes
from opensam.runtime import save_torch

log = logging.getLogger(__name__)


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
    """Dense CLIP tower → decoder → L2-normalised embeddings → class log-probabilities.

    Buffers: ``text_embeddings`` (C, D) float32 L2-normalised; ``logit_scale`` () float32 (the
    CLIP model's ``exp(logit_scale)``, fixed); ``mean``/``std`` (3,) the CLIP image normalisation.
    """

    text_embeddings: torch.Tensor
    logit_scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        tower: DenseImageTower,
        decoder: Decoder,
        text_embeddings: torch.Tensor,
        logit_scale: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.tower = tower
        self.decoder = decoder
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        """Grid (h, w) of :meth:`embed` for a square ``image_size`` input (pool weights' grid)."""
        return self.decoder.out_grid(self.tower.grid_hw((image_size, image_size)))

    def embed(self, images: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] → (B, D, h, w) float, L2-normalised per location.

        ``feature_dropout`` > 0 zeroes whole channels of the embedding with that rate before
        the normalisation, in training and eval mode alike (the online student's
        feature-perturbed view, UniMatch's feature perturbation)."""
        x = (images.to(self.mean.device, non_blocking=True) - self.mean) / self.std
        with current_runtime().autocast():  # bf16 / fp16 on CUDA only (runtime.precision)
            emb = self.decoder(self.tower(x))
        emb = emb.float()  # the dropout and the aggregation run in fp32
        if feature_dropout > 0:
            emb = nn.functional.dropout2d(emb, feature_dropout, training=True)
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
    ) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1]; pool_weights (B, M, h, w) float32 and winner
        (B, H, W) int64 (see :func:`opensam.model.aggregation.prepare_mask_inputs`) or None →
        (B, C, H, W) log-probabilities; ``feature_dropout`` as in :meth:`embed`."""
        out_hw = (images.shape[-2], images.shape[-1])
        return self.log_probs(self.embed(images, feature_dropout), out_hw, pool_weights, winner)


def _assemble(
    visual: nn.Module,
    clip: ClipParams,
    text: torch.Tensor,
    scale: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> OpenSamModel:
    tower = DenseImageTower(visual)
    decoder = build_decoder(clip.decoder, tower.embed_dim)
    if text.shape[1] != tower.embed_dim:
        raise InputError(f"text embeddings have D={text.shape[1]}, image tower D={tower.embed_dim}")
    return OpenSamModel(tower, decoder, text, scale, mean, std)


def build_model(clip: ClipParams, prompts: list[str], drop_path: float = 0.0) -> OpenSamModel:
    """A fresh model from CLIP weights (``clip.pretrained``); the text tower encodes ``prompts``
    once (C = len(prompts)) and is then dropped."""
    clip_model = cast(Any, create_clip(clip.model, clip.pretrained, drop_path))
    text = encode_prompts(clip_model, get_tokenizer(clip.model), prompts, clip.templates)
    scale = float(clip_model.logit_scale.detach().exp())
    mean, std = image_mean_std(clip_model)
    model = _assemble(clip_model.visual, clip, text, scale, mean, std)
    return model.to(current_runtime().device).eval()  # runtime.device (the CPU by default)


def forward_batch(
    model: nn.Module, batch: Mapping[str, Any], use_masks: bool, feature_dropout: float = 0.0
) -> torch.Tensor:
    """The one forward pass of a loader batch: (B, C, H, W) log-probabilities on the model's
    device (autograd as the caller sets it); SAM aggregation when ``use_masks``, else the
    per-pixel prediction (``pool_weights=None``); ``feature_dropout`` > 0 is passed on to the
    model (:meth:`OpenSamModel.embed`)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    images = batch["image"].to(device)
    pool = batch["pool_weights"].to(device) if use_masks else None
    winner = batch["winner"].to(device) if use_masks else None
    extra = {"feature_dropout": feature_dropout} if feature_dropout > 0 else {}
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
    ``text_embeddings`` (C, D) float32, ``epoch``, ``val_miou`` (None unless given), plus
    ``extra``."""
    ckpt: dict[str, Any] = {"epoch": None, "val_miou": None}
    ckpt.update(extra)
    ckpt.update(
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        clip=dataclasses.asdict(clip),
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
    state = ckpt.pop("state_dict")
    text = ckpt["text_embeddings"]
    try:
        visual = create_visual(clip.model, drop_path)
        model = _assemble(visual, clip, text, 1.0, (0.0,) * 3, (1.0,) * 3)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: weights do not fit {clip.model} ({first[:200]})") from None
    weights = model.state_dict().items()
    bad = [k for k, v in weights if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise InputError(f"{path}: weights hold NaN or infinite values ({quote(bad[0])}, ...)")
    return model.to(current_runtime().device).eval(), ckpt
