"""Evaluation of segmentation models: batched inference, confusion matrices, overlay images.

Inference runs the model's own forward pass, either with SAM mask aggregation (``use_masks=True``:
the batch's ``pool_weights`` and ``winner`` from the mask store) or per pixel (``use_masks=False``:
``pool_weights=None``, the upsampled embedding · text prediction). mIoU itself is computed only in
:mod:`opensam.eval.metrics`; this module accumulates the confusion matrix it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from opensam.constants import IGNORE_INDEX
from opensam.data.datasets import SegDataset, make_loader
from opensam.eval.metrics import confusion_matrix, miou_report
from opensam.eval.plots import DEFAULT_STRIDE, confusion_rows
from opensam.model.aggregation import class_ids
from opensam.model.segmenter import forward_batch
from opensam.parallel.context import current_runtime
from opensam.parallel.sharding import gather_in_order, shard_loader, sum_over_ranks
from opensam.prepared import Prepared, read_prepared

log = logging.getLogger(__name__)

# (ids, images (B, 3, H, W) float [0, 1], labels (B, H, W) int64, preds (B, H, W) int64), on CPU
BatchSink = Callable[[list[str], torch.Tensor, torch.Tensor, torch.Tensor], None]


def build_loader(
    model: nn.Module,
    prepared: Path,
    ids: Sequence[str],
    label_dir: Path | None,
    masks: Path | None,
    batch_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """An unshuffled loader of :class:`SegDataset` items on the model's embedding grid."""
    image_size = read_prepared(prepared).image_size
    grid_hw = model.grid_hw(image_size)  # type: ignore[operator]
    dataset = SegDataset(Path(prepared), list(ids), label_dir, masks, grid_hw)
    return make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)


def forward_batch_modes(
    model: nn.Module, batch: Mapping[str, Any], modes: Sequence[bool]
) -> list[torch.Tensor]:
    """(B, C, H, W) float32 CPU log-probabilities of one batch, one per ``use_masks`` in ``modes``.

    A model with ``embed``/``log_probs`` (:class:`opensam.model.segmenter.OpenSamModel`) embeds
    the images once for all modes (the image tower dominates the cost); any other module is
    called once per mode as ``model(images, pool_weights=..., winner=...)``.
    """
    shared = len(modes) > 1 and hasattr(model, "embed") and hasattr(model, "log_probs")
    outs = []
    with torch.inference_mode():  # the model autocasts on CUDA (runtime.precision)
        if not shared:
            return [forward_batch(model, batch, m).float().cpu() for m in modes]
        images = batch["image"].to(next(model.parameters()).device, non_blocking=True)
        emb = model.embed(images)  # type: ignore[operator]
        for use_masks in modes:
            pool = batch["pool_weights"].to(images.device, non_blocking=True) if use_masks else None
            winner = batch["winner"].to(images.device, non_blocking=True) if use_masks else None
            out_hw = (images.shape[-2], images.shape[-1])
            out = model.log_probs(emb, out_hw, pool, winner)  # type: ignore[operator]
            outs.append(out.float().cpu())
    return outs


def predict_batches(
    model: nn.Module, loader: DataLoader, modes: Sequence[bool], desc: str = "predict"
) -> Iterator[tuple[Mapping[str, Any], list[torch.Tensor]]]:
    """Yield ``(batch, [log_probs (B, C, H, W) float32 per mode])``, the model in eval mode.

    Inference mode is entered per batch (not around the ``yield``), so the caller's code between
    batches runs with its own autograd state.
    """
    model.eval()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        yield batch, forward_batch_modes(model, batch, modes)


def predict_loader(
    model: nn.Module, loader: DataLoader, use_masks: bool
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield ``(ids, log_probs (B, C, H, W) float32)`` per batch of ``loader``.

    ``use_masks=False`` passes ``pool_weights=None``: the per-pixel prediction.
    """
    for batch, (log_probs,) in predict_batches(model, loader, (use_masks,)):
        yield [str(i) for i in batch["id"]], log_probs


def evaluate_model_modes(
    model: nn.Module,
    prepared: Path,
    ids: Sequence[str],
    label_dir: Path,
    masks: Path | None,
    batch_size: int,
    modes: Sequence[bool] = (True, False),
    sink: BatchSink | None = None,
    num_workers: int = 0,
) -> dict[bool, np.ndarray]:
    """``{use_masks: confusion (C, C) int64}`` for each mode, from one pass over ``ids``.

    Confusion rows are ground truth, columns prediction; labels come from ``label_dir/<id>.png``
    (255 = ignored). ``masks`` (the mask store) is needed when a mode uses masks. ``sink``, when
    given, receives every batch's ids, images, labels and the first mode's hard predictions (e.g.
    to write overlays) without another inference pass. Under torchrun every rank calls this,
    takes its own batches and gets the full confusion; the sink runs on rank 0, in order.
    """
    if any(modes) and masks is None:
        raise ValueError("use_masks=True needs a mask store")
    store = masks if any(modes) else None
    loader = build_loader(model, prepared, ids, label_dir, store, batch_size, num_workers)
    return loader_confusions(model, loader, modes, sink)


def loader_confusions(
    model: nn.Module,
    loader: DataLoader,
    modes: Sequence[bool] = (True,),
    sink: BatchSink | None = None,
    desc: str = "evaluate",
) -> dict[bool, np.ndarray]:
    """``{use_masks: confusion (C, C) int64}`` over a labelled ``loader`` (model in eval mode;
    its training mode is restored). ``sink``: see :func:`evaluate_model_modes`. Under torchrun
    every rank calls this, takes its own batches and gets the full confusion; the sink runs on
    rank 0, in the one-process batch order."""
    was_training = model.training
    loader, numbers = shard_loader(loader)
    rt, held = current_runtime(), []  # held: this rank's sink calls, by batch number
    confusion: dict[bool, np.ndarray] = {}
    batches = predict_batches(model, loader, modes, desc=desc)
    for b, (batch, outs) in zip(numbers, batches, strict=True):
        labels = batch["label"].long()
        for use_masks, log_probs in zip(modes, outs, strict=True):
            pred = class_ids(log_probs)
            conf = np.asarray(confusion_matrix(pred, labels, log_probs.shape[1]), dtype=np.int64)
            confusion[use_masks] = confusion[use_masks] + conf if use_masks in confusion else conf
            if sink is not None and use_masks == modes[0]:
                call = ([str(i) for i in batch["id"]], batch["image"], labels, pred)
                if rt.distributed:
                    held.append((b, call))
                else:
                    sink(*call)
    model.train(was_training)
    if rt.distributed:
        confusion = sum_over_ranks(confusion)
        if sink is not None:
            for call in gather_in_order(held):  # every rank takes part in the gather
                if rt.is_main:
                    sink(*call)
    if not confusion:
        raise ValueError("no images to evaluate")
    return confusion


def evaluate_model(
    model: nn.Module,
    prepared: Path,
    ids: Sequence[str],
    label_dir: Path,
    masks: Path | None,
    batch_size: int,
    use_masks: bool,
    sink: BatchSink | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Confusion matrix (C, C) int64 (rows = ground truth, columns = prediction) over ``ids``.

    Labels come from ``label_dir/<id>.png`` (255 = ignored). ``masks`` (the mask store) is needed
    only with ``use_masks``. ``sink``: see :func:`evaluate_model_modes`.
    """
    modes = (use_masks,)
    return evaluate_model_modes(
        model, prepared, ids, label_dir, masks, batch_size, modes, sink, num_workers
    )[use_masks]


SPLITS = ("train", "val", "test")
MODES = {"with_masks": True, "without_masks": False}


def evaluate_splits(
    model: nn.Module,
    prepared: Path,
    split_ids: Mapping[str, Sequence[str]],
    masks: Path | None,
    batch_size: int,
    class_names: Sequence[str],
    use_masks: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{split: miou_report}`` (percent) for each non-empty split, labels from
    ``prepared/labels``; with SAM aggregation when ``use_masks``."""
    out: dict[str, dict[str, Any]] = {}
    for split, ids in split_ids.items():
        if not ids:
            log.warning("split %s is empty: not evaluated", split)
            continue
        labels = Path(prepared) / "labels"
        conf = evaluate_model(model, prepared, list(ids), labels, masks, batch_size, use_masks)
        out[split] = miou_report(conf, list(class_names))
    return out


def evaluate_ensemble(
    models: Sequence[nn.Module],
    prepared: Path,
    ids: Sequence[str],
    label_dir: Path,
    masks: Path | None,
    batch_size: int,
    use_masks: bool = True,
) -> np.ndarray:
    """Confusion (C, C) int64 of the logit ensemble of ``models`` over ``ids`` (seed 2's
    ensemble: the mean of separately trained heads' logits).

    Each model runs on its own loader, on its own embedding grid (a CLIP and a DINO backbone
    need not share one), over the same ids in the same order; their per-pixel log-probabilities
    are averaged. The mean of log-softmaxes is the mean of the logits less a per-pixel constant,
    so its argmax is that of the mean logits.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if use_masks and masks is None:
        raise ValueError("use_masks=True needs a mask store")
    store = masks if use_masks else None
    streams = [
        predict_batches(
            m, build_loader(m, prepared, ids, label_dir, store, batch_size), (use_masks,)
        )
        for m in models
    ]
    confusion: np.ndarray | None = None
    for outs in zip(*streams, strict=True):
        batch_ids = [[str(i) for i in batch["id"]] for batch, _ in outs]
        if any(b != batch_ids[0] for b in batch_ids):
            raise RuntimeError("the ensemble's loaders are out of step")
        mean = torch.stack([log_probs for _, (log_probs,) in outs]).mean(dim=0)
        labels = outs[0][0]["label"].long()
        conf = np.asarray(confusion_matrix(class_ids(mean), labels, mean.shape[1]), np.int64)
        confusion = conf if confusion is None else confusion + conf
    if confusion is None:
        raise ValueError("no images to evaluate")
    return confusion


def evaluate_models(
    models: Mapping[str, nn.Module],
    prepared: Prepared,
    masks: Path,
    batch_size: int,
    plotted: tuple[str, str] | None = None,
    sink: BatchSink | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """``{model: {with_masks|without_masks: {split: miou_report}}}`` and the confusion matrix of
    the ``plotted`` (model, split) with masks, whose batches also go to ``sink``.

    Both mask modes come from one pass per (model, split): the images are embedded once."""
    results: dict[str, Any] = {}
    plotted_conf = None
    modes = tuple(MODES.values())  # with masks first: the sink sees the with-masks prediction
    names = list(prepared.classes)
    loaders: dict[tuple[str, tuple[int, int]], DataLoader] = {}  # the models share a split's
    for model_name, model in models.items():  # loader, so its mask inputs are computed once
        results[model_name] = {mode: {} for mode in MODES}
        grid_hw = model.grid_hw(prepared.image_size)  # type: ignore[operator]
        for split in SPLITS:
            ids = prepared.ids(split)
            if not ids:
                log.warning("split %s is empty; skipped", split)
                continue
            is_plotted = (model_name, split) == plotted
            key = (split, (int(grid_hw[0]), int(grid_hw[1])))
            if key not in loaders:
                loaders[key] = build_loader(
                    model, prepared.root, ids, prepared.labels_dir, masks, batch_size
                )
            confs = loader_confusions(
                model, loaders[key], modes, sink if is_plotted else None, desc=split
            )
            plotted_conf = confs[True] if is_plotted else plotted_conf
            for mode, use_masks in MODES.items():
                results[model_name][mode][split] = miou_report(confs[use_masks], names)
    return results, plotted_conf


def colorize_labels(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Class ids (H, W) int -> RGB (H, W, 3) uint8; 255 and any id without a colour are black."""
    labels = np.asarray(labels)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: min(len(colors), IGNORE_INDEX)] = colors[:IGNORE_INDEX]
    palette[IGNORE_INDEX] = 0
    return palette[np.clip(labels, 0, 255).astype(np.uint8)]


def render_overlay(
    image: np.ndarray, label: np.ndarray, pred: np.ndarray, colors: np.ndarray
) -> np.ndarray:
    """Input | ground truth | prediction side by side: (H, 3W, 3) uint8.

    image: (H, W, 3) uint8 RGB; label, pred: (H, W) class ids (255 = black); colors: (C, 3) uint8.
    """
    if image.shape[:2] != label.shape or label.shape != pred.shape:
        raise ValueError(f"shapes differ: image {image.shape}, label {label.shape}, {pred.shape}")
    return np.concatenate([image, colorize_labels(label, colors), colorize_labels(pred, colors)], 1)


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


class PlotCollector:
    """A :data:`BatchSink` that writes ``overlay_dir/<id>.png`` for the first ``max_overlays``
    images and keeps DVC confusion rows (:func:`opensam.eval.plots.confusion_rows`) for all of
    them."""

    def __init__(
        self,
        overlay_dir: Path,
        colors: np.ndarray,
        class_names: Sequence[str],
        max_overlays: int,
        stride: int = DEFAULT_STRIDE,
    ) -> None:
        self.overlay_dir = Path(overlay_dir)
        self.colors = colors
        self.class_names = list(class_names)
        self.max_overlays = max_overlays
        self.stride = stride
        self.rows: list[dict[str, str]] = []
        self.written: list[Path] = []

    def __call__(
        self, ids: list[str], images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor
    ) -> None:
        for i, image_id in enumerate(ids):
            label, pred = labels[i].numpy(), preds[i].numpy()
            self.rows += confusion_rows(pred, label, self.class_names, self.stride)
            if len(self.written) < self.max_overlays:
                panel = render_overlay(image_to_uint8(images[i]), label, pred, self.colors)
                path = self.overlay_dir / f"{image_id}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(panel).save(path)
                self.written.append(path)


def format_eval_table(results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """A compact text table: one line per (model, mask mode), mIoU (%) per split."""
    splits: list[str] = []
    for modes in results.values():
        for per_split in modes.values():
            splits += [s for s in per_split if s not in splits]
    lines = [f"{'model':<10} {'masks':<14}" + "".join(f"{s:>8}" for s in splits)]
    for model_name, modes in results.items():
        for mode, per_split in modes.items():
            mious = [per_split.get(s, {}).get("miou") for s in splits]
            cells = "".join(f"{m:8.2f}" if m is not None else f"{'-':>8}" for m in mious)
            lines.append(f"{model_name:<10} {mode:<14}{cells}")
    return "\n".join(lines)


__all__ = [
    "BatchSink",
    "PlotCollector",
    "build_loader",
    "colorize_labels",
    "evaluate_ensemble",
    "evaluate_model",
    "evaluate_model_modes",
    "evaluate_models",
    "loader_confusions",
    "forward_batch_modes",
    "format_eval_table",
    "image_to_uint8",
    "predict_batches",
    "predict_loader",
    "render_overlay",
]
