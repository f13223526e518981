"""Offline self-training rounds (thesis Experiment 3): noisy students on labelled + pseudo-labelled
data, each restarted from the warm teacher, the pool relabelled by the best student so far.

Round 1 trains on the pseudo-labels of the ``pseudolabel`` stage; round r >= 2 relabels the pool
with the best student so far (into ``<ckpt_root>/pseudo<r>``, kept for a resume). Each round's
training checkpoints into ``<ckpt_root>/iter<r>``, so a killed run resumes where it stopped. The
best student by val mIoU (ties: the earlier round) is returned.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opensam.config import PseudoParams, StudentParams
from opensam.data.augment import Augmenter
from opensam.data.datasets import make_train_loaders
from opensam.eval.evaluation import evaluate_splits
from opensam.model.segmenter import OpenSamModel, load_checkpoint
from opensam.parallel.context import barrier, main_output
from opensam.prepared import Prepared
from opensam.train.engine import TrainConfig
from opensam.train.pseudo_labels import generate_pseudo_labels, measure_pseudo_quality
from opensam.train.supervised import train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTrainingInputs:
    """What the rounds read: the prepared data, mask store, warm teacher and round-1 labels."""

    prepared: Prepared
    masks: Path
    teacher: Path
    pseudo: Path
    pool_ids: tuple[str, ...]
    classes: tuple[str, ...]


@dataclass
class SelfTrainingResult:
    model: OpenSamModel
    best_round: int
    best_val: float
    report: dict[str, Any]


def relabel_pool(
    inputs: SelfTrainingInputs, state: dict[str, torch.Tensor], pseudo: PseudoParams, out: Path
) -> dict[str, Any] | None:
    """Pseudo-label the pool with the model holding ``state`` into ``out`` (kept for a resume);
    their quality vs hidden ground truth (None if unknown or ``out`` already existed)."""
    if out.is_dir():
        return None
    teacher, _ = load_checkpoint(inputs.teacher)
    teacher.load_state_dict(state)
    with main_output(out) as tmp:  # under torchrun: rank 0 merges the ranks' shards
        summary = generate_pseudo_labels(
            teacher,
            inputs.prepared.root,
            list(inputs.pool_ids),
            inputs.masks,
            tmp,
            pseudo.conf_threshold,
            pseudo.batch_size,
            class_names=inputs.classes,
        )
    barrier()  # every rank trains on ``out`` next: wait until rank 0 has renamed it
    return summary.get("vs_hidden_gt")


def train_round(
    inputs: SelfTrainingInputs,
    cfg: StudentParams,
    config: TrainConfig,
    pseudo_dir: Path,
    ckpt_dir: Path,
    live: Any,
) -> OpenSamModel:
    """One noisy student from the warm teacher; returns it holding its best epoch."""
    model, _ = load_checkpoint(inputs.teacher, drop_path=cfg.drop_path)
    prep = inputs.prepared
    masks, aug = inputs.masks if cfg.use_masks else None, Augmenter() if cfg.augment else None
    train, pseudo, val = make_train_loaders(
        prep.root,
        prep.train_epoch_ids,
        prep.val,
        masks,
        model.grid_hw(prep.image_size),
        cfg.batch_size,
        config.seed,
        aug,
        (inputs.pool_ids, pseudo_dir),
        cfg.num_workers,
    )
    # the step budget is the labelled batches, whatever the pool size (the control's too)
    train_model(
        model,
        train,
        config,
        val_loader=val,
        pseudo_loader=pseudo,
        checkpoint_dir=ckpt_dir,
        live=live,
        steps_per_epoch=len(train),
    )
    return model


def score_splits(
    inputs: SelfTrainingInputs, model: OpenSamModel, cfg: StudentParams, splits: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``{split: miou_report}`` of ``model`` with the student's mask setting."""
    split_ids = inputs.prepared.split_ids(splits)
    return evaluate_splits(
        model,
        inputs.prepared.root,
        split_ids,
        inputs.masks,
        cfg.batch_size,
        list(inputs.classes),
        use_masks=cfg.use_masks,
    )


def run_self_training(
    inputs: SelfTrainingInputs,
    cfg: StudentParams,
    pseudo: PseudoParams,
    base: TrainConfig,
    ckpt_root: Path,
    live: Any = None,
    relabel: bool = True,
) -> SelfTrainingResult:
    """``cfg.iterations`` rounds; the result holds the best student and the per-round report
    (``iter<r>``: train/val mIoU and pseudo-label quality; ``best``: its round, val and test).
    ``relabel=False``: every round trains on ``inputs.pseudo`` (the oracle's true labels)."""
    report: dict[str, Any] = {}
    best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # (round, val, weights)
    pseudo_dir, quality = inputs.pseudo, None
    model: OpenSamModel | None = None
    for r in range(1, cfg.iterations + 1):
        if best is not None and relabel:  # the best student so far is the teacher
            pseudo_dir = ckpt_root / f"pseudo{r}"
            quality = relabel_pool(inputs, best[2], pseudo, pseudo_dir)
        config = dataclasses.replace(base, seed=base.seed + r)
        model = train_round(inputs, cfg, config, pseudo_dir, ckpt_root / f"iter{r}", live)
        scores = score_splits(inputs, model, cfg, ("train", "val"))
        quality = quality or measure_pseudo_quality(
            pseudo_dir, inputs.prepared.root, inputs.pool_ids, inputs.classes
        )
        report[f"iter{r}"] = {**scores, "pseudo": quality or {"miou": None}}
        val = scores.get("val", scores["train"])["miou"] or 0.0
        if best is None or val > best[1]:
            best = (r, val, {k: v.clone() for k, v in model.state_dict().items()})
    if best is None or model is None:
        raise ValueError("student.iterations must be >= 1")
    model.load_state_dict(best[2])
    test = score_splits(inputs, model, cfg, ("test",))
    report["best"] = {"iter": best[0], "val": report[f"iter{best[0]}"].get("val"), **test}
    log.info("student: best round %d, val mIoU %.2f", best[0], best[1])
    return SelfTrainingResult(model, best[0], best[1], report)
