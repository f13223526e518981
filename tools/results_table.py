"""Write README's results table from the committed metrics (``metrics/eval.json``, ``pseudo.json``).

The table sits between ``<!-- results-table -->`` and ``<!-- /results-table -->`` in README.md:
one row per model (mIoU in percent, with region masks; the last column without), the gain of the
student over the labelled-only control, the share of the control → oracle gap it closes (when
the data set has hidden ground truth and the oracle ran), and a line with the pseudo-labels'
mIoU against the hidden ground truth when the data set has one.

    python tools/results_table.py          # rewrite the table in README.md
    python tools/results_table.py --check  # exit 1 if README's table is not the metrics'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"
MODELS = {
    "zeroshot": "zero-shot CLIP + masks",
    "teacher": "teacher (labelled only)",
    "control": "control (labelled only, the student's schedule)",
    "student": "student (self-training)",
    "oracle": "oracle (the student's run on the pool's true labels)",
}


def _miou(report: dict[str, Any], mode: str, split: str) -> str:
    value = report.get(mode, {}).get(split, {}).get("miou")
    return "–" if value is None else f"{value:.2f}"


def results_table(metrics: Path) -> str:
    """The markdown table of ``metrics/eval.json`` (and ``metrics/pseudo.json``, if present)."""
    evaluation = json.loads((metrics / "eval.json").read_text())
    lines = [
        "| model | val mIoU | test mIoU | test mIoU, no masks |",
        "|---|---|---|---|",
    ]
    for key, label in MODELS.items():
        if key in evaluation:
            report = evaluation[key]
            lines.append(
                f"| {label} | {_miou(report, 'with_masks', 'val')} "
                f"| {_miou(report, 'with_masks', 'test')} "
                f"| {_miou(report, 'without_masks', 'test')} |"
            )
    gain = evaluation.get("gain", {})
    if gain:
        val, test = (gain.get(s, {}).get("miou") for s in ("val", "test"))
        lines.append(
            f"| **gain** (student − control) | **{val:+.2f}** | **{test:+.2f}** | |"
            if val is not None and test is not None
            else "| **gain** (student − control) | – | – | |"
        )
    gap = evaluation.get("gap_closed", {})
    if "oracle" in evaluation and gap:  # the share of the control → oracle gap
        cells = [gap.get(s, {}) for s in ("val", "test")]
        val, test = (
            f"{c['percent']:.1f} %"
            if c.get("percent") is not None
            else f"– (gap {c['oracle_minus_control']:+.2f})"
            if c.get("oracle_minus_control") is not None
            else "–"
            for c in cells
        )
        lines.append(f"| gap closed (student − control) / (oracle − control) | {val} | {test} | |")
    pseudo_path = metrics / "pseudo.json"
    if pseudo_path.is_file():
        pseudo = json.loads(pseudo_path.read_text())
        hidden = pseudo.get("vs_hidden_gt")
        if hidden and hidden.get("miou") is not None:
            kept = 100 * (1 - float(pseudo.get("ignored_fraction", 0.0)))
            lines += [
                "",
                f"Offline pseudo-labels: {hidden['miou']:.2f} mIoU against the hidden ground truth"
                f" of the unlabelled photos, on the {kept:.1f} % of their pixels above the"
                " confidence threshold.",
            ]
    return "\n".join(lines)


def fill(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md: markers {BEGIN} ... {END} not found")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report a stale table")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    readme = args.root / "README.md"
    text = readme.read_text()
    new = fill(text, results_table(args.root / "metrics"))
    if new == text:
        return 0
    if args.check:
        print(
            "README.md: the results table differs from metrics/: run python tools/results_table.py"
        )
        return 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
