"""Typed, frozen views of ``params.yaml``.

Stage scripts call :func:`load_params` once with the path DVC gives them; library code only ever
receives these dataclasses (or plain typed arguments), never the raw dict.
"""

from __future__ import annotations

import dataclasses
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
    steps: int = 300
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
class RuntimeParams:
    """Where every torch stage runs (``opensam.parallel.context``); nproc > 1 = torchrun."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA only; the CPU runs fp32)
    nproc: int = 1  # processes per node


@dataclass(frozen=True)
class MasksParams:
    generator: str = "superpixels"  # sam | superpixels | regions
    max_ratio: int = 8
    compactness: float = 10.0  # superpixels only
    workers: int = 1  # threads per rank for the CPU generators (superpixels, regions); not SAM


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
class ClipParams:
    model: str = "opensam-tiny"
    pretrained: str | None = None  # open_clip tag, local file path, or None (random init)
    templates: bool = False  # average several prompt templates per class
    decoder: str = "upsample"


@dataclass(frozen=True)
class AblationParams:
    pps: tuple[int, ...] = (8, 16, 32, 64)
    min_region_area: tuple[int, ...] = (0, 100)
    images: int = 47


@dataclass(frozen=True)
class TrainParams:
    """Shared by the teacher warm-up and the student (one loop, different params)."""

    epochs: int = 10
    lr_max: float = 1e-3
    lr_min: float = 1e-5
    weight_decay: float = 1e-8
    batch_size: int = 8
    betas: tuple[float, float] = (0.9, 0.999)
    class_weights: str | tuple[float, ...] = "auto"
    augment: bool = True
    drop_path: float = 0.0
    use_masks: bool = True  # SAM aggregation inside the training forward pass
    num_workers: int = 0


@dataclass(frozen=True)
class StudentParams(TrainParams):
    mode: str = "offline"  # offline: the thesis's rounds | online: EMA teacher, weak-to-strong
    iterations: int = 3  # offline
    alpha_f: float = 1.0  # offline: final pseudo-label loss weight of the ramp
    t1: float = 0.2
    t2: float = 0.8
    unsup_weight: float = 1.0  # online: λ of the confident-unlabelled loss
    conf_threshold: float = 0.95  # online: pixels below are ignored
    ema_decay: float = 0.99  # online: EMA teacher decay per step
    feature_dropout: float = 0.5  # online: channel dropout on the dense embedding (2nd view)
    cutmix_prob: float = 0.5  # online: share of strong views that are CutMixed


@dataclass(frozen=True)
class PseudoParams:
    conf_threshold: float | None = None
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
    classes: tuple[ClassSpec, ...] = ()
    data: DataParams = field(default_factory=DataParams)
    demo: DemoParams = field(default_factory=DemoParams)
    demo_clip: DemoClipParams = field(default_factory=DemoClipParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    masks: MasksParams = field(default_factory=MasksParams)
    sam: SamParams = field(default_factory=SamParams)
    clip: ClipParams = field(default_factory=ClipParams)
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
    from opensam.validation import check_params  # the rules import these dataclasses

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
