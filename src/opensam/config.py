"""Typed, frozen views of ``params.yaml``: the one place of its schema, defaults and rules.

Stage scripts call :func:`load_params` once with the path DVC gives them; library code only ever
receives these dataclasses (or plain typed arguments), never the raw dict. Each dataclass default
equals ``params.yaml``'s value (tests/test_config.py checks it). :func:`check_params` holds every
range and cross-field rule; its messages read ``<source>: <key.path>: must be <rule>, got
<value>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from opensam.errors import InputError, quote

T = TypeVar("T")
MIN_IMAGE_SIZE = 32  # the CLIP towers have stride 32: a smaller image has no embedding cell
MAX_IMAGE_SIZE = 2048  # prepared images are image_size² RGB, and so is every mask
MAX_YAML_NODES = 100_000  # a params file expanding (through aliases) past this is refused
# sam2.model values (opensam.masks.sam2_masks.SAM2_MODELS maps each to its config and file)
SAM2_MODEL_NAMES = (
    "sam2.1_hiera_tiny",
    "sam2.1_hiera_small",
    "sam2.1_hiera_base_plus",
    "sam2.1_hiera_large",
)
BACKBONE_NAMES = ("clip", "dino", "clip+dino")  # opensam.model.backbones.BACKBONES
HEAD_NAMES = ("auto", "text", "linear", "mlp")  # opensam.model.heads; auto: resolved_head()
HEAD_INITS = ("auto", "text", "prototypes")


@dataclass(frozen=True)
class ClassSpec:
    """One semantic class: its id is its position in ``Params.classes``."""

    name: str
    prompt: str
    color: tuple[int, int, int] | None = None  # overlay / export colour; None = from labelmap


@dataclass(frozen=True)
class SplitParams:
    """Labelled split sizes: integers are counts, floats in (0, 1) are fractions."""

    train: int | float = 60
    val: int | float = 40
    test: int | float = 200


@dataclass(frozen=True)
class DataParams:
    source: str = "data/demo"
    format: str = "cvat"  # cvat | voc
    unlabelled: str | None = "data/demo/unlabelled"
    unlabelled_gt: str | None = "data/demo/unlabelled_gt"  # never used for training
    split: SplitParams = field(default_factory=SplitParams)
    unknown_colour_max_pixels: int = 500  # per image; fewer → mapped to 255 with a warning
    seed: int = 0  # split order; its own seed, so the training ``seed`` never reruns prepare


@dataclass(frozen=True)
class DemoParams:
    labelled: int = 300
    unlabelled: int = 480
    width: int = 1024
    height: int = 683
    seed: int = 0  # the demo's own seed: the training ``seed`` never regenerates the demo


@dataclass(frozen=True)
class DemoClipParams:
    """The demo CLIP (stage ``demo_clip``): its caption corpus and contrastive training."""

    seed: int = 1  # the caption corpus's own seed (never the demo photos')
    scenes: int = 600  # generated scenes; training crops are drawn from them at random
    heldout_scenes: int = 30  # further scenes for the held-out zero-shot image accuracy
    render_width: int = 512  # scenes are drawn at this width (demo aspect), then squashed
    steps: int = 200
    batch_size: int = 64
    crop_size: int = 64
    min_crop: float = 0.25  # crop side range, as a fraction of the scene's
    max_crop: float = 0.5
    focus: float = 0.8  # share of crops centred on an object
    lr: float = 0.002
    weight_decay: float = 0.05
    warmup_steps: int = 40
    pool: str = "dense_mean"  # dense_mean | encode_image
    workers: int = 2  # scene rendering processes


@dataclass(frozen=True)
class DemoSamParams:
    """The demo SAM (stage ``demo_sam``): its scene corpus and boundary training."""

    seed: int = 2  # the corpus's own seed (never the demo photos')
    scenes: int = 1000  # generated scenes with their object and part masks
    heldout_scenes: int = 40  # further scenes: held-out mask quality (metrics/demo_sam.json)
    render_width: int = 512  # scenes are drawn at this width (demo aspect), then squashed
    steps: int = 1400
    batch_size: int = 8
    crop_size: int = 128
    width: int = 16  # channels of the U-Net's first level
    lr: float = 0.003
    weight_decay: float = 0.0001
    border_weight: float = 4.0  # loss weight of border pixels
    workers: int = 2  # scene rendering processes


@dataclass(frozen=True)
class DemoDinoParams:
    """The demo DINO (stage ``demo_dino``): its scene corpus and self-distillation training."""

    seed: int = 3  # the corpus's own seed (never the demo photos')
    scenes: int = 400  # generated scenes; multi-crop views are drawn from them at random
    heldout_scenes: int = 30  # further scenes: held-out crop accuracy and dense linear probe
    render_width: int = 512  # scenes are drawn at this width (demo aspect), then squashed
    steps: int = 150
    batch_size: int = 24
    global_crop: int = 64  # side of the two global views (pixels)
    local_crop: int = 32  # side of the local views
    local_views: int = 2
    out_dim: int = 1024  # DINO head prototypes
    lr: float = 0.001
    weight_decay: float = 0.04
    warmup_steps: int = 30
    momentum: float = 0.99  # teacher EMA at the start (cosine to 1)
    workers: int = 2  # scene rendering processes


@dataclass(frozen=True)
class RuntimeParams:
    """Where every torch stage runs (``opensam.parallel.context``); nproc > 1 = torchrun."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA only; the CPU runs fp32)
    nproc: int = 1  # processes per node


@dataclass(frozen=True)
class MasksParams:
    generator: str = "demo_sam"  # demo_sam | sam | sam2 | superpixels | regions
    checkpoint: str = "models/demo_sam.pt"  # demo_sam's weights (SAM's: sam.checkpoint)
    max_ratio: int = 8
    compactness: float = 10.0  # superpixels only
    workers: int = 2  # threads per rank for the CPU generators (all but SAM)


@dataclass(frozen=True)
class SamParams:
    model: str = "vit_h"
    checkpoint: str | None = "models/sam_vit_h_4b8939.pth"
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    input: str = "prepared"  # prepared | original
    device: str = "auto"  # auto = runtime.device


@dataclass(frozen=True)
class Sam2Params:
    """SAM 2.1 (``masks.generator: sam2``): the sam2 package's model and automatic generator."""

    model: str = "sam2.1_hiera_tiny"  # sam2.1_hiera_tiny | _small | _base_plus | _large
    checkpoint: str | None = "models/sam2.1_hiera_tiny.pt"  # None = random weights (tests)
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8  # SAM2AutomaticMaskGenerator's defaults
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    device: str = "auto"  # auto = runtime.device


@dataclass(frozen=True)
class ClipParams:
    model: str = "opensam-tiny"
    pretrained: str | None = "models/demo_clip.pt"  # open_clip tag, file path, None = random
    templates: bool = False  # average several prompt templates per class
    decoder: str = "upsample"


@dataclass(frozen=True)
class DinoParams:
    """The self-supervised ViT of ``model.backbone: dino`` and ``clip+dino``."""

    model: str = "opensam-dino-tiny"  # or a timm name, e.g. vit_base_patch14_dinov2.lvd142m
    pretrained: str | None = "models/demo_dino.pt"  # file | hub (local HF cache) | None = random


@dataclass(frozen=True)
class ModelParams:
    """Backbone and classification head of the segmenter (the checkpoint records them)."""

    backbone: str = "clip"  # clip | dino | clip+dino
    head: str = "auto"  # auto | text (CLIP's fixed text classifier) | linear | mlp
    head_init: str = "auto"  # auto | text (CLIP's prompts) | prototypes (mean labelled embedding)
    mlp_hidden: int = 256  # mlp only
    freeze_backbone: bool = False  # True: only the head (and decoder) train

    @property
    def has_clip(self) -> bool:
        return "clip" in self.backbone.split("+")

    @property
    def has_dino(self) -> bool:
        return "dino" in self.backbone.split("+")

    def resolved_head(self) -> str:
        """``auto``: the text head on ``clip`` (today's model), a linear head otherwise."""
        if self.head != "auto":
            return self.head
        return "text" if self.backbone == "clip" else "linear"

    def resolved_init(self) -> str:
        """``auto``: the text embeddings where CLIP is present, class prototypes otherwise."""
        if self.head_init != "auto":
            return self.head_init
        return "text" if self.has_clip else "prototypes"


@dataclass(frozen=True)
class AblationParams:
    pps: tuple[int, ...] = (8, 16, 32, 64)
    min_region_area: tuple[int, ...] = (0, 100)
    images: int = 47


@dataclass(frozen=True)
class TrainParams:
    """Shared by the teacher warm-up and the student (one loop, different params)."""

    epochs: int = 10
    lr_max: float = 5e-4
    lr_min: float = 1e-5
    weight_decay: float = 1e-8
    batch_size: int = 8
    betas: tuple[float, float] = (0.9, 0.999)
    class_weights: str | tuple[float, ...] = "auto"
    augment: bool = True
    drop_path: float = 0.0
    use_masks: bool = True  # SAM aggregation inside the training forward pass
    num_workers: int = 0


PERTURBATIONS = ("dropout", "complementary")  # student.perturbation


@dataclass(frozen=True)
class StudentParams(TrainParams):
    epochs: int = 6
    drop_path: float = 0.1
    mode: str = "online"  # offline: the thesis's rounds | online: EMA teacher, weak-to-strong
    iterations: int = 3  # offline
    alpha_f: float = 1.0  # offline: final pseudo-label loss weight of the ramp
    t1: float = 0.2
    t2: float = 0.8
    unsup_weight: float = 1.0  # online: λ of the confident-unlabelled loss
    conf_threshold: float = 0.9  # online: pixels below are ignored
    ema_decay: float = 0.99  # online: EMA teacher decay per step
    feature_dropout: float = 0.5  # online: channel dropout on the dense embedding (2nd view)
    cutmix_prob: float = 0.5  # online: share of strong views that are CutMixed
    # online: dropout (a CutMix view + a channel-dropout view, UniMatch) | complementary (two
    # CutMix views whose embeddings keep complementary channels, UniMatch V2)
    perturbation: str = "dropout"


@dataclass(frozen=True)
class PseudoParams:
    conf_threshold: float | None = 0.9
    batch_size: int = 16


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 16
    overlays: int = 8


@dataclass(frozen=True)
class PredictParams:
    batch_size: int = 8
    low_conf: float = 0.5


@dataclass(frozen=True)
class Params:
    seed: int = 0
    image_size: int = 256
    pps: int = 16
    min_region_area: int = 0
    ratio: int = 2
    # the first N of the prepared train split (None = all): val and test never move
    labelled_train: int | None = None
    classes: tuple[ClassSpec, ...] = ()
    data: DataParams = field(default_factory=DataParams)
    demo: DemoParams = field(default_factory=DemoParams)
    demo_clip: DemoClipParams = field(default_factory=DemoClipParams)
    demo_sam: DemoSamParams = field(default_factory=DemoSamParams)
    demo_dino: DemoDinoParams = field(default_factory=DemoDinoParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    masks: MasksParams = field(default_factory=MasksParams)
    sam: SamParams = field(default_factory=SamParams)
    sam2: Sam2Params = field(default_factory=Sam2Params)
    clip: ClipParams = field(default_factory=ClipParams)
    model: ModelParams = field(default_factory=ModelParams)
    dino: DinoParams = field(default_factory=DinoParams)
    ablation: AblationParams = field(default_factory=AblationParams)
    warmup: TrainParams = field(default_factory=TrainParams)
    student: StudentParams = field(default_factory=StudentParams)
    pseudo: PseudoParams = field(default_factory=PseudoParams)
    eval: EvalParams = field(default_factory=EvalParams)
    predict: PredictParams = field(default_factory=PredictParams)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.classes]


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Turn a YAML value into ``tp`` (dataclass, tuple, union, scalar); errors name ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {quote(value)}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[-1] if errors else f"{where}: bad value {quote(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(f"{where}: expected a list, got {quote(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InputError(f"{where}: expected a number, got {quote(value)}")
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"{where}: expected a number, got {quote(value)}") from None
        if not math.isfinite(number):
            raise InputError(f"{where}: must be a finite number, got {quote(value)}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {quote(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {quote(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {quote(value)}")
        return value
    return value


def _build(cls: type[T], raw: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}unknown key(s) {', '.join(unknown)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping and return the frozen :class:`Params`.

    Types and unknown keys are checked while building, then every range and cross-field rule
    (:func:`check_params`); errors read ``<source>: <key.path>: <problem>``.
    """
    try:
        params = _build(Params, raw, "")
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    check_params(params, source)
    return params


def _check_yaml_graph(node: yaml.Node, source: str) -> None:
    """Refuse duplicate mapping keys (YAML says they are an error; PyYAML keeps the last one,
    DVC calls the file corrupted) and a document whose aliases expand past MAX_YAML_NODES (an
    alias bomb: 1 KB of YAML that expands to 10^9 values)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            if sizes[id(n)] < 0:
                raise InputError(f"{source}: line {n.start_mark.line + 1}: recursive alias")
            return sizes[id(n)]
        sizes[id(n)] = -1
        total = 1
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        line = key.start_mark.line + 1
                        raise InputError(f"{source}: line {line}: duplicate key {quote(key.value)}")
                    seen.add(key.value)
                total += size(key) + size(value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(item) for item in n.value)
        if total > MAX_YAML_NODES:
            raise InputError(f"{source}: expands to over {MAX_YAML_NODES} values (YAML aliases)")
        sizes[id(n)] = total
        return total

    size(node)


def read_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate keys and alias bombs (one-line
    :class:`InputError` naming ``source``) before any value is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_graph(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise InputError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def load_params(path: str | Path) -> Params:
    """Read a params YAML file given by the caller (a stage passes DVC's ``params.yaml``)."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return parse_params(raw, str(path))


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


def _check_model(m: ModelParams, source: str) -> None:
    r = functools.partial(_require, source)
    r(
        "model.backbone",
        m.backbone in BACKBONE_NAMES,
        f"one of {', '.join(BACKBONE_NAMES)}",
        m.backbone,
    )
    r("model.head", m.head in HEAD_NAMES, f"one of {', '.join(HEAD_NAMES)}", m.head)
    r("model.head_init", m.head_init in HEAD_INITS, f"one of {', '.join(HEAD_INITS)}", m.head_init)
    r("model.mlp_hidden", m.mlp_hidden >= 1, ">= 1", m.mlp_hidden)
    rule = "auto, linear or mlp unless model.backbone is clip (zero-shot is CLIP's)"
    r("model.head", m.head != "text" or m.backbone == "clip", rule, m.head)
    rule = "auto or prototypes when model.backbone has no CLIP (no text embeddings)"
    r("model.head_init", m.head_init != "text" or m.has_clip, rule, m.head_init)


def _check_demo_dino(d: DemoDinoParams, source: str) -> None:
    r = functools.partial(_require, source)
    for name in ("scenes", "steps", "local_views", "out_dim", "workers"):
        r(f"demo_dino.{name}", getattr(d, name) >= 1, ">= 1", getattr(d, name))
    rule = ">= 2 (the dense probe fits on half, scores on the other)"
    r("demo_dino.heldout_scenes", d.heldout_scenes >= 2, rule, d.heldout_scenes)
    r("demo_dino.batch_size", d.batch_size >= 2, ">= 2", d.batch_size)
    r("demo_dino.render_width", 16 <= d.render_width <= 8192, "in 16..8192", d.render_width)
    r("demo_dino.global_crop", d.global_crop >= 16, ">= 16", d.global_crop)
    rule = "in 8..demo_dino.global_crop"
    r("demo_dino.local_crop", 8 <= d.local_crop <= d.global_crop, rule, d.local_crop)
    r("demo_dino.lr", d.lr > 0, "> 0", d.lr)
    r("demo_dino.weight_decay", d.weight_decay >= 0, ">= 0", d.weight_decay)
    r("demo_dino.warmup_steps", d.warmup_steps >= 0, ">= 0", d.warmup_steps)
    r("demo_dino.momentum", 0 <= d.momentum <= 1, "in 0..1", d.momentum)
    r("demo_dino.seed", 0 <= d.seed < 2**32, ">= 0 and < 2**32", d.seed)


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
    lt = p.labelled_train
    r("labelled_train", lt is None or lt >= 1, "null (the whole train split) or >= 1", lt)
    _check_classes(p.classes, source)
    d = p.data
    r("data.format", d.format in ("cvat", "voc"), "cvat or voc", d.format)
    r(
        "data.unknown_colour_max_pixels",
        d.unknown_colour_max_pixels >= 0,
        ">= 0",
        d.unknown_colour_max_pixels,
    )
    _check_split(d.split, source)
    r("demo.labelled", p.demo.labelled >= 1, ">= 1", p.demo.labelled)
    r("demo.unlabelled", p.demo.unlabelled >= 0, ">= 0", p.demo.unlabelled)
    for side in ("width", "height"):
        value = getattr(p.demo, side)
        r(f"demo.{side}", 16 <= value <= 8192, "in 16..8192", value)
    rt = p.runtime
    r("runtime.nproc", rt.nproc >= 1, ">= 1", rt.nproc)
    r(
        "runtime.precision",
        rt.precision in ("auto", "fp32", "bf16", "fp16"),
        "auto, fp32, bf16 or fp16",
        rt.precision,
    )
    kind, _, index = rt.device.partition(":")
    ok = rt.device in ("auto", "cpu") or (kind == "cuda" and (not index or index.isdigit()))
    r("runtime.device", ok, "auto, cpu, cuda or cuda:N", rt.device)
    # masks.generator: checked against the generator registry (opensam.masks.generators)
    r("masks.compactness", p.masks.compactness > 0, "> 0", p.masks.compactness)
    r("masks.workers", p.masks.workers >= 1, ">= 1", p.masks.workers)
    s = p.sam
    r("sam.points_per_batch", s.points_per_batch >= 1, ">= 1", s.points_per_batch)
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        r(f"sam.{name}", 0 <= getattr(s, name) <= 1, "in 0..1", getattr(s, name))
    r("sam.crop_n_layers", s.crop_n_layers >= 0, ">= 0", s.crop_n_layers)
    r("sam.input", s.input in ("prepared", "original"), "prepared or original", s.input)
    s2 = p.sam2
    r("sam2.model", s2.model in SAM2_MODEL_NAMES, f"one of {', '.join(SAM2_MODEL_NAMES)}", s2.model)
    r("sam2.points_per_batch", s2.points_per_batch >= 1, ">= 1", s2.points_per_batch)
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        r(f"sam2.{name}", 0 <= getattr(s2, name) <= 1, "in 0..1", getattr(s2, name))
    kind, _, index = s2.device.partition(":")
    ok = s2.device in ("auto", "cpu") or (kind == "cuda" and (not index or index.isdigit()))
    r("sam2.device", ok, "auto, cpu, cuda or cuda:N", s2.device)
    _check_model(p.model, source)
    _check_demo_dino(p.demo_dino, source)
    a = p.ablation
    r("ablation.pps", all(1 <= v <= 128 for v in a.pps), "values in 1..128", list(a.pps))
    r(
        "ablation.min_region_area",
        all(v >= 0 for v in a.min_region_area),
        "values >= 0",
        list(a.min_region_area),
    )
    r("ablation.images", a.images >= 1, ">= 1", a.images)
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
    rule = "dropout or complementary"
    r("student.perturbation", st.perturbation in PERTURBATIONS, rule, st.perturbation)
    conf = p.pseudo.conf_threshold
    r("pseudo.conf_threshold", conf is None or 0 <= conf <= 1, "null or in 0..1", conf)
    r("pseudo.batch_size", p.pseudo.batch_size >= 1, ">= 1", p.pseudo.batch_size)
    r("eval.batch_size", p.eval.batch_size >= 1, ">= 1", p.eval.batch_size)
    r("eval.overlays", p.eval.overlays >= 0, ">= 0", p.eval.overlays)
    r("predict.batch_size", p.predict.batch_size >= 1, ">= 1", p.predict.batch_size)
    r("predict.low_conf", 0 <= p.predict.low_conf <= 1, "in 0..1", p.predict.low_conf)
