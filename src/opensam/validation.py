"""Every range and cross-field rule of params.yaml, checked once, at load
(:func:`opensam.config.parse_params` calls :func:`check_params`). Messages read
``<source>: <key.path>: must be <rule>, got <value>``.
"""

from __future__ import annotations

import functools
from typing import Any

from opensam.config import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ClassSpec,
    Params,
    SplitParams,
    TrainParams,
)
from opensam.errors import InputError, quote


def _require(source: str, key: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise InputError(f"{source}: {key}: must be {rule}, got {quote(value)}")


def _check_split(split: SplitParams, source: str) -> None:
    fractions = 0.0
    for name in ("train", "val", "test"):
        value, key = getattr(split, name), f"data.split.{name}"
        if isinstance(value, float):
            rule = "a count (an integer such as 60) or a fraction in (0, 1) such as 0.7"
            _require(source, key, 0 < value < 1 or (name != "train" and value == 0), rule, value)
            fractions += value
        else:
            _require(
                source,
                key,
                value >= (1 if name == "train" else 0),
                ">= 1" if name == "train" else ">= 0",
                value,
            )
    _require(
        source, "data.split", fractions <= 1 + 1e-9, "fractions that sum to at most 1", fractions
    )


def _check_training(p: TrainParams, key: str, n_classes: int, source: str) -> None:
    _require(source, f"{key}.epochs", p.epochs >= 1, ">= 1", p.epochs)
    _require(source, f"{key}.lr_max", p.lr_max > 0, "> 0", p.lr_max)
    _require(source, f"{key}.lr_min", 0 <= p.lr_min <= p.lr_max, "in 0..lr_max", p.lr_min)
    _require(source, f"{key}.weight_decay", p.weight_decay >= 0, ">= 0", p.weight_decay)
    _require(source, f"{key}.batch_size", p.batch_size >= 1, ">= 1", p.batch_size)
    _require(source, f"{key}.betas", all(0 <= b < 1 for b in p.betas), "in [0, 1)", p.betas)
    _require(source, f"{key}.drop_path", 0 <= p.drop_path < 1, "in [0, 1)", p.drop_path)
    _require(source, f"{key}.num_workers", p.num_workers >= 0, ">= 0", p.num_workers)
    weights = p.class_weights
    if isinstance(weights, str):
        _require(source, f"{key}.class_weights", weights == "auto", "'auto' or a list", weights)
    else:
        ok = len(weights) == n_classes and all(w >= 0 for w in weights) and sum(weights) > 0
        rule = f"{n_classes} weights >= 0 (one per class), not all 0"
        _require(source, f"{key}.class_weights", ok, rule, list(weights))


def _check_classes(classes: tuple[ClassSpec, ...], source: str) -> None:
    if not classes:
        raise InputError(f"{source}: classes: must not be empty")
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        key = f"classes[{i}]"
        _require(source, f"{key}.name", bool(c.name.strip()), "a non-empty name", c.name)
        norm = c.name.strip().lower()
        if norm in seen:
            raise InputError(
                f"{source}: {key}.name: {quote(c.name)} repeats classes[{seen[norm]}].name "
                "(names are matched case-insensitively)"
            )
        seen[norm] = i
        _require(source, f"{key}.prompt", bool(c.prompt.strip()), "a non-empty prompt", c.prompt)
        if c.color is not None:
            ok = all(0 <= v <= 255 for v in c.color)
            _require(source, f"{key}.color", ok, "three values in 0..255", list(c.color))


def check_params(p: Params, source: str = "params.yaml") -> None:
    """Every range and cross-field rule of params; raises :class:`InputError` naming the key."""
    r = functools.partial(_require, source)
    r("seed", 0 <= p.seed < 2**32, ">= 0 and < 2**32", p.seed)
    size_rule = f"in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
    r("image_size", MIN_IMAGE_SIZE <= p.image_size <= MAX_IMAGE_SIZE, size_rule, p.image_size)
    r("pps", 1 <= p.pps <= 128, "in 1..128", p.pps)
    r("min_region_area", p.min_region_area >= 0, ">= 0", p.min_region_area)
    r("masks.max_ratio", p.masks.max_ratio >= 0, ">= 0", p.masks.max_ratio)
    rule = f"in 0..masks.max_ratio ({p.masks.max_ratio}: masks cover only that pool)"
    r("ratio", 0 <= p.ratio <= p.masks.max_ratio, rule, p.ratio)
    _check_classes(p.classes, source)
    d = p.data
    r("data.format", d.format in ("cvat", "voc"), "cvat or voc", d.format)
    r("data.unknown_colour_max_pixels", d.unknown_colour_max_pixels >= 0, ">= 0",
      d.unknown_colour_max_pixels)  # fmt: skip
    _check_split(d.split, source)
    r("demo.labelled", p.demo.labelled >= 1, ">= 1", p.demo.labelled)
    r("demo.unlabelled", p.demo.unlabelled >= 0, ">= 0", p.demo.unlabelled)
    for side in ("width", "height"):
        value = getattr(p.demo, side)
        r(f"demo.{side}", 16 <= value <= 8192, "in 16..8192", value)
    rt = p.runtime
    r("runtime.nproc", rt.nproc >= 1, ">= 1", rt.nproc)
    r("runtime.precision", rt.precision in ("auto", "fp32", "bf16", "fp16"),
      "auto, fp32, bf16 or fp16", rt.precision)  # fmt: skip
    kind, _, index = rt.device.partition(":")
    ok = rt.device in ("auto", "cpu") or (kind == "cuda" and (not index or index.isdigit()))
    r("runtime.device", ok, "auto, cpu, cuda or cuda:N", rt.device)
    # masks.generator: checked against the generator registry (opensam.masks.generators)
    r("masks.compactness", p.masks.compactness > 0, "> 0", p.masks.compactness)
    s = p.sam
    r("sam.points_per_batch", s.points_per_batch >= 1, ">= 1", s.points_per_batch)
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        r(f"sam.{name}", 0 <= getattr(s, name) <= 1, "in 0..1", getattr(s, name))
    r("sam.crop_n_layers", s.crop_n_layers >= 0, ">= 0", s.crop_n_layers)
    r("sam.input", s.input in ("prepared", "original"), "prepared or original", s.input)
    a = p.ablation
    r("ablation.pps", all(1 <= v <= 128 for v in a.pps), "values in 1..128", list(a.pps))
    r("ablation.min_region_area", all(v >= 0 for v in a.min_region_area), "values >= 0",
      list(a.min_region_area))  # fmt: skip
    r("ablation.images", a.images >= 0, ">= 0", a.images)
    _check_training(p.warmup, "warmup", len(p.classes), source)
    _check_training(p.student, "student", len(p.classes), source)
    st = p.student
    r("student.iterations", st.iterations >= 1, ">= 1", st.iterations)
    r("student.alpha_f", st.alpha_f >= 0, ">= 0", st.alpha_f)
    r("student.t1", 0 <= st.t1 <= st.t2, "in 0..t2", st.t1)
    r("student.t2", st.t2 <= 1, "<= 1", st.t2)
    r("student.mode", st.mode in ("offline", "online"), "offline or online", st.mode)
    for name in ("conf_threshold", "ema_decay", "feature_dropout", "cutmix_prob"):
        r(f"student.{name}", 0 <= getattr(st, name) <= 1, "in 0..1", getattr(st, name))
    r("student.unsup_weight", st.unsup_weight >= 0, ">= 0", st.unsup_weight)
    conf = p.pseudo.conf_threshold
    r("pseudo.conf_threshold", conf is None or 0 <= conf <= 1, "null or in 0..1", conf)
    r("pseudo.batch_size", p.pseudo.batch_size >= 1, ">= 1", p.pseudo.batch_size)
    r("eval.batch_size", p.eval.batch_size >= 1, ">= 1", p.eval.batch_size)
    r("eval.overlays", p.eval.overlays >= 0, ">= 0", p.eval.overlays)
    r("predict.batch_size", p.predict.batch_size >= 1, ">= 1", p.predict.batch_size)
    r("predict.low_conf", 0 <= p.predict.low_conf <= 1, "in 0..1", p.predict.low_conf)
