"""Seed 2's table on our data: the warm-up teacher per backbone, head and frozen/fine-tuned
backbone, over seeds, and the logit ensemble of a CLIP and a DINO head.

    python bench/backbones.py --dino-weights W.pt              # every row, seeds 0 1 2
    python bench/backbones.py --rows dino:linear:frozen --seeds 0 --dino-weights W.pt

A row is ``backbone:head:frozen|ft`` (``model.backbone``, ``model.head``,
``model.freeze_backbone``); ``ensemble:HEAD:frozen|ft`` averages the per-pixel
log-probabilities of that row's ``clip`` and ``dino`` runs of the same seed
(:func:`opensam.eval.evaluation.evaluate_ensemble`; seed 2's mean of logits). Each run is the
warmup stage itself (``stages/warmup.py``) on the workspace's ``data/prepared`` and
``data/masks.h5`` (the mask generator of ``params.yaml``), with ``params.yaml`` and the row's
overrides, in a folder of its own under ``--work``; a run whose metrics exist is not run again,
so a killed table resumes. Every other setting (epochs, lr, batch) is the warm-up's default.

``--dino-weights``: the demo DINO's weights, trained by the ``demo_dino`` stage when
``model.backbone`` has DINO (``dvc exp run -S model.backbone=dino`` trains them; with the
default ``clip`` the stage writes only a marker). Printed: one line per row with val and test
mIoU (with masks, percent) as mean ± std over the seeds, each seed's figure, and the
``dvc exp run`` that gives the same run as an experiment; ``--out`` keeps them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from opensam.runtime import atomic_path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("clip", "dino", "clip+dino")
HEADS = ("linear", "mlp")
DEFAULT_ROWS = [
    "clip:text:ft",  # today's default: CLIP's fixed text head, backbone fine-tuned
    *(f"{b}:{h}:{f}" for b in BACKBONES for h in HEADS for f in ("frozen", "ft")),
    "ensemble:mlp:frozen",
    "ensemble:mlp:ft",
]


def parse_row(row: str) -> tuple[str, str, bool]:
    """``backbone:head:frozen|ft`` → (backbone, head, frozen)."""
    parts = row.split(":")
    if len(parts) != 3 or parts[2] not in ("frozen", "ft"):
        raise SystemExit(f"error: --rows: {row!r} is not backbone:head:frozen|ft")
    backbone, head, freeze = parts
    if backbone not in (*BACKBONES, "ensemble") or head not in ("text", *HEADS):
        raise SystemExit(f"error: --rows: {row!r}: unknown backbone or head")
    if head == "text" and backbone != "clip":
        raise SystemExit(f"error: --rows: {row!r}: the text head needs CLIP alone")
    return backbone, head, freeze == "frozen"


def overrides(backbone: str, head: str, frozen: bool, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "model.backbone": backbone,
        "model.head": head,
        "model.freeze_backbone": frozen,
    }


def exp_command(settings: dict[str, Any]) -> str:
    flags = " ".join(
        f"-S {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()
    )
    return f"dvc exp run {flags} warmup"


def write_params(base: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    raw = json.loads(json.dumps(base))
    for dotted, value in settings.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def run_warmup(base: dict[str, Any], settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The warmup stage with ``settings`` in ``run_dir`` (skipped when its metrics exist)."""
    metrics = run_dir / "warmup.json"
    if not metrics.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_params(base, settings, run_dir / "params.yaml")
        argv = [
            sys.executable, str(ROOT / "stages" / "warmup.py"),
            "--prepared", "data/prepared", "--masks", "data/masks.h5",
            "--data-metrics", "metrics/data.json", "--out", str(run_dir / "teacher.pt"),
            "--metrics", str(metrics), "--live", str(run_dir / "live"),
            "--params", str(run_dir / "params.yaml"),
        ]  # fmt: skip
        start = time.monotonic()
        with open(run_dir / "log.txt", "w") as log:
            done = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            lines = (run_dir / "log.txt").read_text().strip().splitlines()
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise SystemExit(f"error: {run_dir / 'log.txt'}: the warm-up failed: {last}")
        with atomic_path(run_dir / "seconds.txt") as tmp:
            tmp.write_text(f"{time.monotonic() - start:.0f}\n")
    report = json.loads(metrics.read_text())
    seconds = run_dir / "seconds.txt"
    return {
        "val": report["val"]["miou"],
        "test": report["test"]["miou"],
        "seconds": float(seconds.read_text()) if seconds.exists() else None,
    }


def run_ensemble(members: list[Path], run_dir: Path) -> dict[str, Any]:
    """Val and test mIoU (with masks) of the mean log-probabilities of ``members``."""
    metrics = run_dir / "ensemble.json"
    if not metrics.exists():
        from opensam.eval.evaluation import evaluate_ensemble
        from opensam.eval.metrics import miou_report
        from opensam.model.segmenter import load_checkpoint
        from opensam.prepared import read_prepared

        prepared = read_prepared(ROOT / "data" / "prepared")
        models = [load_checkpoint(m)[0] for m in members]
        out: dict[str, Any] = {}
        for split in ("val", "test"):
            conf = evaluate_ensemble(
                models, prepared.root, prepared.ids(split), prepared.labels_dir,
                ROOT / "data" / "masks.h5", 16,
            )  # fmt: skip
            out[split] = miou_report(conf, list(prepared.classes))["miou"]
        with atomic_path(metrics) as tmp:
            tmp.write_text(json.dumps(out) + "\n")
    return {**json.loads(metrics.read_text()), "seconds": None}


def summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def split_figures(per_seed: dict[int, dict[str, Any]]) -> tuple[list[float], list[float]]:
    """A row's val and test mIoU, one per seed."""
    return [r["val"] for r in per_seed.values()], [r["test"] for r in per_seed.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/opensam-backbones"))
    parser.add_argument("--dino-weights", type=Path, default=ROOT / "models" / "demo_dino.pt")
    parser.add_argument("--out", type=Path, help="write every figure as JSON")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="more overrides for every row, e.g. warmup.lr_max=0.005 (part of the run's folder)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = [(r, *parse_row(r)) for r in args.rows]
    extra: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set: {item!r} is not KEY=VALUE")
        extra[key] = yaml.safe_load(value)
    suffix = "".join(f"_{k}={v}" for k, v in extra.items())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base.setdefault("dino", {})["pretrained"] = str(args.dino_weights.resolve())
    results: dict[str, dict[str, Any]] = {}
    for row, backbone, head, frozen in rows:
        per_seed: dict[int, dict[str, Any]] = {}
        for seed in args.seeds:
            freeze = "frozen" if frozen else "ft"
            if backbone == "ensemble":
                members = []
                for member in ("clip", "dino"):
                    settings = {**overrides(member, head, frozen, seed), **extra}
                    member_dir = args.work / f"{member}_{head}_{freeze}_s{seed}{suffix}"
                    run_warmup(base, settings, member_dir)
                    members.append(member_dir / "teacher.pt")
                ensemble_dir = args.work / f"ensemble_{head}_{freeze}_s{seed}{suffix}"
                per_seed[seed] = run_ensemble(members, ensemble_dir)
            else:
                settings = {**overrides(backbone, head, frozen, seed), **extra}
                name = f"{backbone.replace('+', '_')}_{head}_{freeze}_s{seed}{suffix}"
                run_dir = args.work / name
                per_seed[seed] = run_warmup(base, settings, run_dir)
                per_seed[seed]["command"] = exp_command(settings)
            print(f"  {row} seed {seed}: {per_seed[seed]}", flush=True)
        results[row] = per_seed
        vals, tests = split_figures(per_seed)
        print(
            f"{row:<24} val {summary(vals):>14}  test {summary(tests):>14}  "
            f"seeds {' '.join(f'{v:.2f}' for v in vals)}",
            flush=True,
        )
    print("\n| backbone | head | backbone trained | val mIoU | test mIoU | seeds | val per seed |")
    print("|---|---|---|---|---|---|---|")
    for row, backbone, head, frozen in rows:
        vals, tests = split_figures(results[row])
        name = "CLIP and DINO, logits averaged" if backbone == "ensemble" else backbone
        print(
            f"| {name} | {head} | {'frozen' if frozen else 'fine-tuned'} | {summary(vals)} "
            f"| {summary(tests)} | {len(vals)} | {' / '.join(f'{v:.2f}' for v in vals)} |"
        )
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
