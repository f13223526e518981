"""A torchrun worker for tests/test_distributed.py: the online loop on a tiny project.

    python -m opensam.apps.launch --nproc 2 tests/dist_online_worker.py \
        PARAMS PREPARED MASKS OUT_FILE [--control] [--kill-after EPOCH]

Trains an untrained opensam-tiny (seed 0) with :func:`opensam.train.online_setup.run_online`
for two epochs, checkpointing in ``OUT_FILE``'s folder; ``--control`` runs λ = 0 (labelled
only); ``--kill-after`` ends every rank with ``os._exit`` once that epoch's checkpoint is
written, like a kill. Every rank saves its final weights to ``OUT_FILE.rank<r>`` (so a test can
check that the ranks agree), rank 0 its weights and history to ``OUT_FILE``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from opensam.config import RuntimeParams, StudentParams, load_params
from opensam.model.segmenter import build_model
from opensam.parallel.context import init_runtime
from opensam.prepared import read_prepared
from opensam.runtime import setup_logging
from opensam.train import engine
from opensam.train.online_setup import online_config, run_online

CFG = StudentParams(epochs=2, batch_size=4, lr_max=1e-3, conf_threshold=0.0, drop_path=0.0)


def train(
    params: Path, prepared: Path, masks: Path, out: Path, control: bool = False,
    kill_after: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run and return (rank 0 also saves) the result: the final state and the history."""
    torch.set_num_threads(1)
    rt = init_runtime(RuntimeParams(device="cpu"))
    p = load_params(params)
    torch.manual_seed(0)
    model = build_model(p.clip, p.prompts)
    data = read_prepared(prepared)
    if kill_after is not None:
        real = engine.save_checkpoint

        def save_then_die(run: Any, path: Path) -> None:
            real(run, path)
            if run.epoch == kill_after:
                sys.stdout.flush()
                os._exit(1)  # noqa: SLF001 - a kill, not a clean exit

        engine.save_checkpoint = save_then_die  # type: ignore[assignment]
    result = run_online(model, CFG, online_config(CFG, None, 3, control), data, masks,
                        data.unlabelled[:6], out.parent / "ckpt", None)  # fmt: skip
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = {"state": state, "history": result.history}
    if rt.distributed:
        torch.save(state, out.with_name(f"{out.name}.rank{rt.rank}"))
    if rt.is_main:
        torch.save(payload, out)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("params", "prepared", "masks", "out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--control", action="store_true")
    parser.add_argument("--kill-after", type=int)
    ns = parser.parse_args()
    setup_logging()
    train(ns.params, ns.prepared, ns.masks, ns.out, ns.control, ns.kill_after)
