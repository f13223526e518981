"""OpenCLIP loading (tags, local files, random init), the tiny offline config, dense image
embeddings and prompt embeddings.

Weights never download silently: an open_clip tag is resolved from the local Hugging Face cache
only, unless downloads are allowed (``allow_download=True`` or ``OPENSAM_ALLOW_DOWNLOAD=1``), so an
offline machine fails at once with a message saying what is missing and how to get it.
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from pickle import UnpicklingError
from typing import Any, cast

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from opensam.errors import InputError

log = logging.getLogger(__name__)

TINY_MODEL = "opensam-tiny"
# A CPU-sized CLIP with the same structure as convnext_base_w (timm ConvNeXt trunk, avg pool, norm,
# linear projection). vocab_size stays 49408 because open_clip's SimpleTokenizer emits those ids.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": 256,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPT_TEMPLATES = (
    "a photo of {}.",
    "a close-up photo of {}.",
    "a bright photo of {}.",
    "a cropped photo of {}.",
    "{}.",
)
DOWNLOAD_ENV = "OPENSAM_ALLOW_DOWNLOAD"


def register_tiny_config() -> None:
    """Add ``opensam-tiny`` to open_clip's model config registry (idempotent)."""
    open_clip.factory._MODEL_CONFIGS[TINY_MODEL] = deepcopy(TINY_CONFIG)


register_tiny_config()


def _model_config(model_name: str, drop_path: float) -> dict[str, Any]:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if "convnext" in m or m == TINY_MODEL)
        raise InputError(f"clip.model '{model_name}': unknown open_clip model (e.g. {known})")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision:
        vision["timm_drop_path"] = drop_path
        vision["timm_model_pretrained"] = False  # never fetch timm ImageNet weights
    elif drop_path > 0:
        log.warning("%s: drop_path only applies to timm image towers; ignored", model_name)
    return dict(cfg)


def _cached_hf_file(repo_id: str, filename: str, allow_download: bool) -> str | None:
    """Return the local path of ``repo_id/filename`` (safetensors first), or None if absent."""
    from huggingface_hub import hf_hub_download

    names = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]
    for local_only in (True, False) if allow_download else (True,):
        for name in names:
            try:
                return str(hf_hub_download(repo_id, name, local_files_only=local_only))
            except Exception as exc:  # missing from cache / offline / no such file on the hub
                log.debug("%s/%s (local_only=%s): %s", repo_id, name, local_only, exc)
    return None


def resolve_pretrained(model_name: str, pretrained: str, allow_download: bool) -> str:
    """Turn an open_clip tag or a file path into a local weights file path.

    Raises :class:`InputError` naming what is missing and how to get it.
    """
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise InputError(
            f"{pretrained}: not a file and not an open_clip tag of {model_name} "
            f"(tags: {', '.join(tags) or 'none'}); set clip.pretrained to a tag, a file or null"
        )
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        path = _cached_hf_file(repo_id, filename, allow_download)
        if path is not None:
            return path
        where = f"hf-hub:{repo_id}/{filename}"
        how = f"`huggingface-cli download {repo_id} {filename}`"
    else:
        url = cfg.get("url", "")
        if allow_download:
            return str(open_clip.download_pretrained(cfg))
        where, how = url, f"download {url}"
    state = "could not be downloaded" if allow_download else "are not in the local cache"
    also = "" if allow_download else f", or set {DOWNLOAD_ENV}=1 to allow downloads"
    raise InputError(
        f"{where}: OpenCLIP weights {model_name}/{pretrained} {state}; fetch them on a machine "
        f"with internet ({how}), or put the file under models/ and set clip.pretrained to its "
        f"path{also}"
    )


# what open_clip raises for a file that is not weights of the model (also one holding {} or a list)
WEIGHTS_FILE_ERRORS = (
    RuntimeError, OSError, ValueError, KeyError, EOFError, UnpicklingError, TypeError,
    AttributeError, StopIteration,
)  # fmt: skip


def create_clip(
    model_name: str,
    pretrained: str | None,
    drop_path: float = 0.0,
    allow_download: bool | None = None,
) -> nn.Module:
    """Build an open_clip CLIP model in fp32 on the CPU, in eval mode.

    ``pretrained`` is an open_clip tag (e.g. ``laion2b_s13b_b82k``), a local checkpoint file, or
    None (random init). ``allow_download`` None reads ``OPENSAM_ALLOW_DOWNLOAD``.
    """
    if allow_download is None:
        allow_download = os.environ.get(DOWNLOAD_ENV, "") == "1"
    cfg = _model_config(model_name, drop_path)
    path = resolve_pretrained(model_name, pretrained, allow_download) if pretrained else None
    try:
        model = open_clip.create_model(model_name, pretrained=path, vision_cfg=cfg["vision_cfg"])
    except WEIGHTS_FILE_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load as {model_name} weights ({first[:200]})") from None
    log.info("CLIP %s, weights: %s", model_name, path or "random init")
    return model.eval()


def create_visual(model_name: str, drop_path: float = 0.0) -> nn.Module:
    """Build only the (randomly initialised) image tower of ``model_name``.

    Used when a checkpoint supplies all weights, so the text tower is never built.
    """
    from open_clip.model import _build_vision_tower

    cfg = _model_config(model_name, drop_path)
    visual: nn.Module = _build_vision_tower(
        cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False)
    )
    return visual


def image_mean_std(clip_model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image normalisation (mean, std) the CLIP model was trained with (RGB, in [0, 1])."""
    cfg = open_clip.get_model_preprocess_cfg(clip_model)
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class DenseImageTower(nn.Module):
    """The CLIP image tower with the pooling cut off: a D×h×w embedding map, stride 32.

    For open_clip's timm ConvNeXt towers (``convnext_base_w``, ``opensam-tiny``) the pooled path
    is ``trunk.forward_features → head.global_pool → head.norm (LayerNorm2d) → proj``. Here the
    LayerNorm2d and the projection are applied at every location instead. Because LayerNorm is not
    linear, the global average of this map equals ``proj(mean_xy(LN(features)))``, not the model's
    ``encode_image`` (``proj(LN(mean_xy(features)))``); they are equal when the map is 1×1.
    """

    stride = 32

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        trunk = getattr(visual, "trunk", None)
        head = getattr(trunk, "head", None)
        if trunk is None or head is None or not hasattr(head, "norm"):
            raise ValueError(
                f"{type(visual).__name__}: dense embeddings need an open_clip timm ConvNeXt tower"
            )
        if not isinstance(getattr(head, "pre_logits", nn.Identity()), nn.Identity):
            raise ValueError("timm head with an MLP (head_hidden_size) is not supported")
        self.trunk: nn.Module = trunk
        self.proj_head: nn.Module = cast(nn.Module, visual.head)  # drop + Linear, on the last dim
        self.embed_dim = self._out_features(self.proj_head)

    @staticmethod
    def _out_features(proj_head: nn.Module) -> int:
        last = [m for m in proj_head.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError(
                "open_clip timm tower without a projection (timm_proj) is not supported"
            )
        return last[-1].out_features

    def grid_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Embedding grid (h, w) for an (H, W) input: stride-4 stem, then three 2× downsamples."""
        return image_hw[0] // self.stride, image_hw[1] // self.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, CLIP-normalised → (B, D, H//32, W//32) float, not L2-normalised."""
        trunk = cast(Any, self.trunk)
        x = trunk.forward_features(images)
        x = trunk.head.norm(x)  # LayerNorm2d: per location over channels
        x = self.proj_head(x.permute(0, 2, 3, 1))
        return x.permute(0, 3, 1, 2).contiguous()


def get_tokenizer(model_name: str) -> Any:
    """open_clip's tokenizer for ``model_name`` (the bundled BPE vocabulary; offline)."""
    return open_clip.get_tokenizer(model_name)


@torch.no_grad()
def encode_prompts(
    clip_model: nn.Module, tokenizer: Any, prompts: list[str], templates: bool
) -> torch.Tensor:
    """Text embeddings of the class prompts: (C, D) float32, L2-normalised per row.

    ``templates=True`` averages the normalised embeddings of :data:`PROMPT_TEMPLATES` filled with
    each prompt, then re-normalises (the CLIP prompt-ensembling recipe).
    """
    clip_model.eval()
    forms = PROMPT_TEMPLATES if templates else ("{}",)
    rows = []
    for prompt in prompts:
        tokens = tokenizer([form.format(prompt) for form in forms])
        emb = cast(Any, clip_model).encode_text(tokens, normalize=True).float()
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)
