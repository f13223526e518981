"""A torchrun worker for tests/test_distributed.py: the training loop on a tiny project.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        PROJECT_DIR OUT_FILE [--kill-after EPOCH]

Trains a dropout-free toy model (so one and two processes see the same computation) with the
shared loop, checkpointing in ``OUT_FILE``'s folder; ``--kill-after`` ends every rank with
``os._exit`` after that epoch, like a kill. Rank 0 saves the final weights, history and a
two-mode evaluation (confusion per mode and the order the sink saw the ids) to ``OUT_FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opensam.config import RuntimeParams
from opensam.data.datasets import make_train_loaders
from opensam.eval.evaluation import evaluate_model_modes
from opensam.parallel.context import init_runtime
from opensam.runtime import setup_logging
from opensam.train.engine import TrainConfig
from opensam.train.supervised import train_model

GRID = (2, 2)
CFG = TrainConfig(
    epochs=3,
    lr_max=0.02,
    lr_min=0.001,
    weight_decay=1e-4,
    batch_size=4,
    class_weights=(0.3, 0.3, 0.2, 0.2),
    use_masks=False,
    alpha_f=0.5,
    seed=3,
)


class PlainToy(nn.Module):
    """OpenSamModel's interface without dropout: a deterministic function of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def grid_hw(self, image_size: int) -> tuple[int, int]:
        return GRID

    def forward(
        self, images: torch.Tensor, pool_weights: Any = None, winner: Any = None
    ) -> torch.Tensor:
        return F.log_softmax(self.head(torch.relu(self.conv(images))), dim=1)


def train(project: Path, out: Path, kill_after: int | None = None) -> dict[str, Any]:
    """Train and evaluate; returns (and on rank 0 saves) the result."""
    torch.set_num_threads(1)
    rt = init_runtime(RuntimeParams(device="cpu"))
    splits = json.loads((project / "prepared" / "splits.json").read_text())
    prepared = project / "prepared"
    pool = (splits["unlabelled"], project / "pseudo")
    train_loader, pseudo, val = make_train_loaders(
        prepared, splits["train"], splits["val"], None, GRID, 4, seed=3, pseudo=pool
    )
    torch.manual_seed(0)
    model = PlainToy()

    def kill(epoch: int, entry: dict[str, Any]) -> None:
        if kill_after is not None and epoch == kill_after:
            sys.stdout.flush()
            os._exit(1)  # noqa: SLF001 - a kill, not a clean exit

    result = train_model(
        model,
        train_loader,
        CFG,
        val_loader=val,
        pseudo_loader=pseudo,
        checkpoint_dir=out.parent / "ckpt",
        on_epoch_end=kill,
    )
    seen: list[str] = []
    confusion = evaluate_model_modes(
        model,
        prepared,
        splits["train"] + splits["val"],
        prepared / "labels",
        None,
        3,
        modes=(False,),
        sink=lambda ids, *_: seen.extend(ids),
    )
    payload = {
        "state": result.last_state,
        "history": result.history,
        "confusion": confusion[False],
        "seen": seen,
    }
    if rt.is_main:
        torch.save(payload, out)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("project", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-after", type=int)
    ns = parser.parse_args()
    setup_logging()
    train(ns.project, ns.out, ns.kill_after)
