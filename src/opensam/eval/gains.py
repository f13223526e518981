"""What the unlabelled photos add: the student's gain over the labelled-only control, and the
share of the control → oracle gap it closes (``metrics/eval.json``'s ``gain`` and
``gap_closed``). Only the ``evaluate`` stage reads this module, so a change to these rules
reruns no training stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def student_gain(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{split: {"miou": student − control}}`` with masks, in percentage points."""
    student, control = results["student"]["with_masks"], results["control"]["with_masks"]
    return {
        split: {"miou": round(student[split]["miou"] - control[split]["miou"], 2)}
        for split in student
        if split in control
    }


NO_ORACLE = "no oracle (the data set has no hidden ground truth for the pool)"


MIN_GAP = 1.0  # mIoU points: the smallest control → oracle gap whose closed share is reported


def gap_closed(
    results: Mapping[str, Any], oracle_missing: str = NO_ORACLE
) -> dict[str, dict[str, Any]]:
    """Per split (with masks): the share of the control → oracle gap that the student closes,
    ``percent`` = 100 · (student − control) / (oracle − control), beside the two differences
    (percentage points). ``percent`` is None, with a ``reason``, when there is no oracle
    (``oracle_missing``) or the oracle is less than :data:`MIN_GAP` points above the control:
    a ratio over a gap that small is noise (one seed's control moves by about that much), so
    e.g. +1.26 over a +0.66 gap is not reported as 191 %. Otherwise it is not clipped: below 0
    the student lost to the control, above 100 it beat the oracle."""
    student, control = results["student"]["with_masks"], results["control"]["with_masks"]
    oracle = results.get("oracle", {}).get("with_masks", {})
    out: dict[str, dict[str, Any]] = {}
    for split in (s for s in student if s in control):
        gain = round(student[split]["miou"] - control[split]["miou"], 2)
        entry: dict[str, Any] = {"percent": None, "student_minus_control": gain}
        if split not in oracle:
            entry |= {"oracle_minus_control": None, "reason": oracle_missing}
        else:
            bound = round(oracle[split]["miou"] - control[split]["miou"], 2)
            entry["oracle_minus_control"] = bound
            if bound <= 0:
                entry["reason"] = "the oracle is not above the control: no gap to close"
            elif bound < MIN_GAP:
                entry["reason"] = (
                    f"the oracle is only {bound:.2f} points above the control (< {MIN_GAP}): "
                    "no measurable gap"
                )
            else:
                entry["percent"] = round(100.0 * gain / bound, 2)
        out[split] = entry
    return out
