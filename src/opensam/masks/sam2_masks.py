"""SAM 2.1 as a region generator (``masks.generator: sam2``): the ``sam2`` package's own model
builder and ``SAM2AutomaticMaskGenerator``, its records turned into a :class:`MaskSet`.

``sam2.model`` names one of the four SAM 2.1 Hiera models (:data:`SAM2_MODELS`: the package's
config name and the official checkpoint's file name). The checkpoint is a file path
(``sam2.checkpoint``): a missing file, an unreadable one or one of another model is a one-line
:class:`InputError` naming the file and where to download the right one. ``sam2`` (and its
hydra/iopath dependencies) is imported only when a model is built, so that this module is cheap
to import for :func:`sam2_checkpoint_sha256` and the tables.

On a CPU-only install (``SAM2_BUILD_CUDA=0``) the package has no ``sam2._C`` extension, so the
predictor's hole filling of low-res mask logits is skipped (the package warns and carries on);
``min_mask_region_area`` is still applied by the automatic generator's own OpenCV
post-processing of the full-size masks.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opensam.config import Sam2Params
from opensam.errors import InputError
from opensam.masks.arrays import MaskSet, mask_set_from_arrays

log = logging.getLogger(__name__)

SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
# sam2.model -> (the sam2 package's hydra config, the official checkpoint's file name)
SAM2_MODELS: dict[str, tuple[str, str]] = {
    "sam2.1_hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_base_plus": (
        "configs/sam2.1/sam2.1_hiera_b+.yaml",
        "sam2.1_hiera_base_plus.pt",
    ),
    "sam2.1_hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
# (trunk embed dim, trunk blocks) -> model: names the model a mismatched checkpoint is for
_SIGNATURES = {
    (96, 12): "sam2.1_hiera_tiny",
    (96, 16): "sam2.1_hiera_small",
    (112, 24): "sam2.1_hiera_base_plus",
    (144, 48): "sam2.1_hiera_large",
}
_PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
# no sam2._C (a CPU-only install): the package warns on every image that hole filling is skipped
_HOLES_WARNING = r"(?s).*Skipping the post-processing step"


class PackageInfoFilter(logging.Filter):
    """Drops the INFO lines the ``sam2`` package logs on the *root* logger (three per image:
    "Computing image embeddings ..."), which would flood a stage's log with thousands of lines;
    its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_package = "sam2" in Path(record.pathname).parts
        return not (record.name == "root" and record.levelno <= logging.INFO and from_package)


def check_sam2_model(model: str) -> tuple[str, str]:
    """(config name, checkpoint file name) of ``sam2.model``; InputError if unknown."""
    if model not in SAM2_MODELS:
        raise InputError(
            f"sam2.model: unknown SAM 2.1 model {model!r} (known: {', '.join(SAM2_MODELS)})"
        )
    return SAM2_MODELS[model]


def sam2_download_hint(model: str) -> str:
    """Where the official checkpoint of ``sam2.model`` comes from (for a not-found error)."""
    name = check_sam2_model(model)[1]
    return f"download {SAM2_URL}{name} (sam2.model {model}) and put it at this path"


def check_sam2_checkpoint(model: str, checkpoint: str | Path) -> Path:
    """``checkpoint`` as a Path; InputError (one line, naming the download) if it is missing."""
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: SAM 2.1 checkpoint not found ({sam2_download_hint(model)})")
    return path


def describe_sam2_state_dict(state: dict[str, Any]) -> str:
    """Name the model a state dict is for (by the Hiera trunk's width and depth)."""
    weight = state.get(_PATCH_KEY)
    if not isinstance(weight, torch.Tensor):
        if isinstance(state.get("image_encoder.patch_embed.proj.weight"), torch.Tensor):
            return "it looks like a SAM 1 checkpoint (masks.generator sam, sam.checkpoint)"
        return f"it is not a SAM 2 state dict (no {_PATCH_KEY})"
    prefix = "image_encoder.trunk.blocks."
    depth = len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    name = _SIGNATURES.get((int(weight.shape[0]), depth))
    shape = f"{weight.shape[0]} wide, {depth} blocks"
    return f"it looks like {name} ({shape} trunk)" if name else f"unknown Hiera trunk ({shape})"


def resolve_sam2_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name.split(":")[0] != "cuda":
        raise InputError(f"sam2.device: expected auto, cpu or cuda, got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise InputError(f"sam2.device: {name} requested but CUDA is not available")
    return torch.device(name)


def build_sam2_model(model: str, device: str = "cpu") -> torch.nn.Module:
    """SAM 2.1 ``model`` with random weights, built by ``sam2.build_sam.build_sam2`` (eval)."""
    config = check_sam2_model(model)[0]
    dev = resolve_sam2_device(device)
    from sam2.build_sam import build_sam2  # heavy: hydra, the sam2 package

    net: torch.nn.Module = build_sam2(config, ckpt_path=None, device=str(dev), mode="eval")
    return net


def load_sam2(model: str, checkpoint: str | Path | None, device: str = "auto") -> torch.nn.Module:
    """Build SAM 2.1 ``model`` through the sam2 package and load ``checkpoint`` into it.

    The checkpoint is the official file (``{"model": state_dict}``) or a bare state dict;
    ``None`` keeps random weights (logged as a warning). Raises :class:`InputError` for an
    unknown model, a missing file (naming the official download), an unreadable file or a
    checkpoint of another model (naming the model it looks like).
    """
    check_sam2_model(model)
    path = None if checkpoint is None else check_sam2_checkpoint(model, checkpoint)
    net = build_sam2_model(model, device)
    if path is None:
        log.warning("sam2.checkpoint is null: SAM 2.1 %s has random weights (tests only)", model)
        return net
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InputError(
            f"{path}: cannot read SAM 2.1 checkpoint ({exc.__class__.__name__})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a SAM 2.1 checkpoint (expected a state dict)")
    try:
        net.load_state_dict(state)
    except RuntimeError:
        what = describe_sam2_state_dict(state)
        raise InputError(
            f"{path}: not a sam2.model={model} checkpoint; {what} ({sam2_download_hint(model)})"
        ) from None
    log.info("loaded SAM 2.1 %s from %s", model, path)
    return net


@dataclass(frozen=True)
class Sam2Options:
    """``SAM2AutomaticMaskGenerator``'s options that opensam sets (same names)."""

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Sam2MaskGenerator:
    """``SAM2AutomaticMaskGenerator`` on a prepared image -> :class:`MaskSet` at its size,
    sorted by area (largest first), empty masks dropped."""

    def __init__(self, model: torch.nn.Module, options: Sam2Options) -> None:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.model, self.opts = model, options
        self.amg = SAM2AutomaticMaskGenerator(model, output_mode="binary_mask", **options.kwargs())

    def records(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The package generator's own records for ``image`` (H, W, 3) uint8."""
        quiet = PackageInfoFilter()
        logging.getLogger().addFilter(quiet)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_HOLES_WARNING, category=UserWarning)
                out: list[dict[str, Any]] = self.amg.generate(image)
        finally:
            logging.getLogger().removeFilter(quiet)
        return out

    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        """Masks of ``image`` (H, W, 3) uint8 at (H, W); ``original`` is not used."""
        out_hw = (int(image.shape[0]), int(image.shape[1]))
        records = self.records(np.require(image, np.uint8, ["C", "W"]))  # torchvision: writable
        if not records:
            return MaskSet.empty(*out_hw)
        masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
        iou = np.array([r["predicted_iou"] for r in records], np.float32)
        stab = np.array([r["stability_score"] for r in records], np.float32)
        return mask_set_from_arrays(masks, iou, stab, out_hw)


def build_sam2_generator(
    sam2: Sam2Params, points_per_side: int, min_region_area: int
) -> Sam2MaskGenerator:
    """Load ``sam2.model`` / ``sam2.checkpoint`` on ``sam2.device`` and wrap it in a generator
    with ``points_per_side`` and ``min_mask_region_area`` = ``min_region_area``."""
    if sam2.points_per_batch < 1:
        raise InputError(f"sam2.points_per_batch: must be >= 1, got {sam2.points_per_batch}")
    model = load_sam2(sam2.model, sam2.checkpoint, sam2.device)
    return Sam2MaskGenerator(
        model,
        Sam2Options(
            points_per_side,
            sam2.points_per_batch,
            sam2.pred_iou_thresh,
            sam2.stability_score_thresh,
            sam2.box_nms_thresh,
            min_region_area,
        ),
    )
