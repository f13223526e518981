"""Classification heads on region embeddings (``model.head``), and class prototypes.

A region embedding is the re-normalised NU-pooled dense map over one mask (D,), the analogue of
a small image's embedding, so seed 2's heads on frozen image features apply per region:

- ``text``: CLIP's fixed text classifier, ``exp(logit_scale) · e · textᵀ`` (no head module;
  :func:`opensam.model.aggregation.aggregate_log_probs`);
- ``linear``: ``W e + b``;
- ``mlp``: one hidden layer with GELU, beside a linear skip: ``W e + b + W₂ GELU(W₁ e + b₁) +
  b₂``. W₂ starts at zero, so an MLP starts as the linear head and both start from the same
  class embeddings.

Both trained heads start from class embeddings (C, D): ``W = scale · E``, ``b = 0``, i.e. the
text classifier (E = CLIP's prompt embeddings) or the nearest-prototype classifier (E = the
L2-normalised mean labelled embedding per class, :func:`class_prototypes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from opensam.model.aggregation import nu_pool_weights

log = logging.getLogger(__name__)


class LinearHead(nn.Module):
    """(..., D) → (..., C) logits, ``W e + b``."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_classes)

    def init_from(self, class_emb: torch.Tensor, scale: float) -> None:
        """W = scale · class_emb (C, D), b = 0."""
        with torch.no_grad():
            self.linear.weight.copy_(scale * class_emb)
            self.linear.bias.zero_()

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)  # type: ignore[no-any-return]


class MlpHead(LinearHead):
    """(..., D) → (..., C) logits: the linear head plus a GELU MLP with one hidden layer, whose
    output layer starts at zero (module doc)."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int) -> None:
        super().__init__(embed_dim, num_classes)
        self.hidden = nn.Linear(embed_dim, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def init_from(self, class_emb: torch.Tensor, scale: float) -> None:
        super().init_from(class_emb, scale)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb) + self.out(F.gelu(self.hidden(emb)))  # type: ignore[no-any-return]


def build_head(name: str, embed_dim: int, num_classes: int, hidden: int) -> LinearHead | None:
    """The trained head ``name`` (``linear`` | ``mlp``), or None for ``text``."""
    if name == "text":
        return None
    if name == "linear":
        return LinearHead(embed_dim, num_classes)
    if name == "mlp":
        return MlpHead(embed_dim, num_classes, hidden)
    raise ValueError(f"unknown head '{name}' (known: text, linear, mlp)")


@torch.no_grad()
def class_prototypes(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
) -> torch.Tensor:
    """The mean labelled embedding per class, L2-normalised: (C, D) float32.

    ``embed`` maps images (B, 3, H, W) in [0, 1] to (B, D, h, w) L2-normalised maps; ``batches``
    yields (images, labels (B, H, W) int64; 255 and other ids ≥ C are in no class). Each
    class's pixels are pooled as one region per image (the NU weights of its label mask, so
    the same upsampled embedding the aggregation pools), weighted by area. A class without
    pixels keeps a zero row (warned).
    """
    sums: torch.Tensor | None = None
    for images, labels in batches:
        emb = embed(images).float().cpu()
        grid = (emb.shape[-2], emb.shape[-1])
        for one, label in zip(emb, labels.cpu(), strict=True):
            masks = torch.stack([label == c for c in range(num_classes)])  # (C, H, W)
            area = masks.flatten(1).sum(1).float()
            weights = nu_pool_weights(masks, grid)  # (C, h, w), rows sum to 1 (0 if empty)
            pooled = torch.einsum("chw,dhw->cd", weights, one) * area[:, None]
            sums = pooled if sums is None else sums + pooled
    if sums is None:
        raise ValueError("class prototypes need at least one labelled image")
    empty = [c for c in range(num_classes) if float(sums[c].abs().sum()) == 0.0]
    if empty:
        log.warning("classes %s have no labelled pixel: zero prototypes", empty)
    return F.normalize(sums, dim=1)
