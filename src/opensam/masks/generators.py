"""Region-mask generators by name, and "compute the mask store of these prepared images".

``MASK_GENERATORS`` maps a name (``masks.generator`` in params) to a builder
``GeneratorSettings -> MaskGenerator`` (one settings object: each builder reads what it needs);
``sam`` and ``sam2`` are imported only when chosen (they pull in torch and segment_anything / sam2).
:func:`precompute_masks` is what the ``masks`` and ``ablation_masks`` stages run: it reuses an
up-to-date store, resumes an interrupted one, and otherwise computes every image's masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from opensam.config import MasksParams, Sam2Params, SamParams
from opensam.errors import InputError
from opensam.masks.arrays import MaskGenerator
from opensam.masks.shards import compute_sharded
from opensam.masks.store import AttrValue, MaskStoreWriter, summarize_store, validate_store
from opensam.masks.superpixels import SuperpixelGenerator
from opensam.masks.workers import write_missing
from opensam.parallel.context import current_runtime
from opensam.prepared import Prepared
from opensam.runtime import remove_path

log = logging.getLogger(__name__)

MAX_PPS = 128
SUPERPIXEL_MODEL = "slic"  # the ``model`` attr of superpixel stores
# SamParams fields that change the masks (device and batch size do not; the checkpoint is
# identified by its sha256, not its path).
_SAM_OUTPUT_FIELDS: tuple[str, ...] = (
    "pred_iou_thresh",
    "stability_score_thresh",
    "box_nms_thresh",
)
_SAM_OUTPUT_FIELDS += ("crop_n_layers", "input")


_SAM2_OUTPUT_FIELDS = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything a builder may read: SAM's point grid (``pps``), the minimum region area, the
    size masks come at, and the params blocks of the generators (each reads its own)."""

    pps: int
    min_region_area: int
    masks: MasksParams
    sam: SamParams
    sam2: Sam2Params
    image_size: int = 256


GeneratorBuilder = Callable[[GeneratorSettings], MaskGenerator]


def _build_superpixels(s: GeneratorSettings) -> MaskGenerator:
    return SuperpixelGenerator(s.pps, s.masks.compactness, s.min_region_area)


def _build_sam(s: GeneratorSettings) -> MaskGenerator:
    # heavy: torch + segment_anything; the ignore covers a sam_masks without the builder yet
    from opensam.masks.sam import build_sam_generator  # type: ignore[attr-defined]

    sam = s.sam
    if sam.device == "auto":  # follow runtime.device (this rank's GPU under torchrun)
        sam = dataclasses.replace(sam, device=str(current_runtime().device))
    generator: MaskGenerator = build_sam_generator(sam, s.pps, s.min_region_area, s.image_size)
    return generator


def _build_regions(s: GeneratorSettings) -> MaskGenerator:
    from opensam.masks.regions import RegionGenerator

    return RegionGenerator(s.pps, s.min_region_area)


def _build_demo_sam(s: GeneratorSettings) -> MaskGenerator:
    from opensam.masks.boundaries import DemoSamGenerator  # torch: only when chosen

    return DemoSamGenerator(s.masks.checkpoint, s.pps, s.min_region_area)


def _build_sam2(s: GeneratorSettings) -> MaskGenerator:
    from opensam.masks.sam2_masks import build_sam2_generator  # heavy: torch + sam2 + hydra

    sam2 = s.sam2
    if sam2.device == "auto":  # follow runtime.device (this rank's GPU under torchrun)
        sam2 = dataclasses.replace(sam2, device=str(current_runtime().device))
    generator: MaskGenerator = build_sam2_generator(sam2, s.pps, s.min_region_area)
    return generator


MASK_GENERATORS: dict[str, GeneratorBuilder] = {
    "demo_sam": _build_demo_sam,  # the demo's SAM stand-in, a learned boundary net (boundaries)
    "superpixels": _build_superpixels,
    "sam": _build_sam,
    "sam2": _build_sam2,  # SAM 2.1 through the sam2 package (opensam.masks.sam2_masks)
    "regions": _build_regions,  # graph-based multi-scale object regions (opensam.masks.regions)
}


def check_mask_params(pps: int, min_region_area: int, image_size: int, where: str) -> None:
    """Raise InputError ("<where>: ...") unless 1 <= pps <= 128 and 0 <= area < image_size²."""
    if not 1 <= pps <= MAX_PPS:
        raise InputError(f"{where}: pps must be in 1..{MAX_PPS}, got {pps}")
    if not 0 <= min_region_area < image_size * image_size:
        raise InputError(
            f"{where}: min_region_area must be in 0..{image_size * image_size - 1} "
            f"(pixels of a {image_size}x{image_size} image), got {min_region_area}"
        )


def check_generator_name(name: str, where: str) -> None:
    """Raise InputError unless ``name`` is a key of MASK_GENERATORS."""
    if name not in MASK_GENERATORS:
        known = ", ".join(sorted(MASK_GENERATORS))
        raise InputError(f"{where}: unknown mask generator {name!r} (known: {known})")


def build_generator(
    name: str,
    pps: int,
    min_region_area: int,
    masks: MasksParams,
    sam: SamParams,
    image_size: int = 256,
    sam2: Sam2Params | None = None,
) -> MaskGenerator:
    """The generator ``name`` (a key of MASK_GENERATORS); masks come at ``image_size``²."""
    check_generator_name(name, "masks.generator")
    settings = GeneratorSettings(pps, min_region_area, masks, sam, sam2 or Sam2Params(), image_size)
    return MASK_GENERATORS[name](settings)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a (large) checkpoint, cached beside it in ``.<name>.sha256`` by size and mtime."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: SAM checkpoint not found (download the official file for sam.model, "
            "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth, from "
            "https://dl.fbaipublicfiles.com/segment_anything/ and put it at this path)"
        )
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = path.with_name(f".{path.name}.sha256")
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    except (OSError, ValueError):
        pass
    sha = file_sha256(path)
    try:
        cache.write_text(json.dumps({**key, "sha256": sha}) + "\n")
    except OSError as exc:  # a read-only models/ folder: just hash again next time
        log.debug("cannot cache %s: %s", cache, exc)
    return sha


def store_attrs(
    generator: str,
    pps: int,
    min_region_area: int,
    image_size: int,
    masks: MasksParams,
    sam: SamParams,
    sam2: Sam2Params | None = None,
) -> dict[str, AttrValue]:
    """The mask store's file attrs (DESIGN.md) plus ``generator_config``, a JSON string of the
    generator settings that change its output, so that a resume never mixes settings."""
    if generator == "sam2":
        from opensam.masks.sam2_masks import check_sam2_checkpoint, check_sam2_model

        sam2 = sam2 or Sam2Params()
        check_sam2_model(sam2.model)
        sha = ""  # null checkpoint: random weights (tests only)
        if sam2.checkpoint is not None:
            sha = checkpoint_sha256(check_sam2_checkpoint(sam2.model, sam2.checkpoint))
        model, config = sam2.model, {k: getattr(sam2, k) for k in _SAM2_OUTPUT_FIELDS}
    elif generator == "sam":
        sha = checkpoint_sha256(sam.checkpoint) if sam.checkpoint else ""
        model, config = sam.model, {k: getattr(sam, k) for k in _SAM_OUTPUT_FIELDS}
    elif generator == "regions":
        sha, model, config = "", "felzenszwalb-hierarchy", {"levels": 4}
    elif generator == "demo_sam":
        if not Path(masks.checkpoint).is_file():
            raise InputError(
                f"{masks.checkpoint}: demo SAM checkpoint not found (run `dvc repro demo_sam`)"
            )
        from opensam.masks.boundaries import DEFAULT_LEVELS, SEED_THRESHOLD

        sha, model = file_sha256(Path(masks.checkpoint)), "demo-sam-boundary-unet"
        config = {"levels": list(DEFAULT_LEVELS), "seed_threshold": SEED_THRESHOLD}
    else:
        sha, model, config = "", SUPERPIXEL_MODEL, {"compactness": masks.compactness}
    return {
        "generator": generator,
        "model": model,
        "checkpoint_sha256": sha,
        "pps": pps,
        "min_region_area": min_region_area,
        "image_size": image_size,
        "generator_config": json.dumps(config, sort_keys=True),
    }


def mask_image_ids(prepared: Prepared, max_ratio: int, where: str = "params.yaml") -> list[str]:
    """All labelled ids (train, val, test) + the first ``max_ratio * len(train)`` unlabelled."""
    if max_ratio < 0:
        raise InputError(f"{where}: masks.max_ratio must be >= 0, got {max_ratio}")
    labelled = [*prepared.train, *prepared.val, *prepared.test]
    pool = list(prepared.unlabelled[: max_ratio * len(prepared.train)])
    return list(dict.fromkeys(labelled + pool))


def ablation_image_ids(prepared: Prepared, count: int, where: str = "params.yaml") -> list[str]:
    """The first ``count`` train ids (all of them, with a warning, if there are fewer)."""
    if count < 1:
        raise InputError(f"{where}: ablation.images must be >= 1, got {count}")
    train = list(prepared.train)
    if len(train) < count:
        log.warning("ablation.images = %d but only %d train images", count, len(train))
    return train[:count]


def compute_mask_store(
    prepared_dir: Path,
    out_path: Path,
    image_ids: Sequence[str],
    generator: MaskGenerator | Callable[[], MaskGenerator],
    attrs: Mapping[str, AttrValue],
    originals: Mapping[str, Path] | None = None,
    workers: int = 1,
) -> dict[str, float]:
    """Write the masks of ``<prepared_dir>/images/<id>.png`` for ``image_ids`` to ``out_path``.

    Reuses ``out_path`` if it already matches (attrs, ids, image digests); otherwise resumes the
    partial store, skipping images already done there, and computes the rest. ``generator`` may
    be a zero-argument builder, called only if some image needs computing (loading SAM is slow).
    ``originals`` maps ids to original photos, handed to ``generate``; ``workers``: threads for
    a CPU generator (see :func:`opensam.masks.workers.write_missing`). Returns
    :func:`opensam.masks.store.summarize_store` of the finished store.
    """
    prepared_dir, out_path = Path(prepared_dir), Path(out_path)
    ids = [str(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids has duplicates")
    size = int(attrs["image_size"])
    paths = {i: prepared_dir / "images" / f"{i}.png" for i in ids}
    for path in paths.values():
        if not path.is_file():
            raise InputError(f"{path}: prepared image not found")
    digests = {i: file_sha256(p) for i, p in paths.items()}
    if (runtime := current_runtime()).distributed:  # torchrun: one shard per rank, then merge
        return compute_sharded(
            out_path, ids, paths, digests, generator, attrs, originals, runtime, workers
        )
    if validate_store(out_path, attrs, ids, digests):
        log.info("%s: up to date, reusing it", out_path)
        return summarize_store(out_path)
    if out_path.exists() or out_path.is_symlink():
        log.info("%s: removing the stale store before rebuilding it", out_path)
        remove_path(out_path)
    with MaskStoreWriter(out_path, attrs, ids) as writer:
        write_missing(
            writer, ids, paths, digests, generator, size, originals, out_path.name, workers
        )
    summary = summarize_store(out_path)
    log.info(
        "%s: %d images, masks per image min %d / median %.1f / max %d, %.0f bytes per image "
        "(raw bit-packed masks / file bytes: %.2f)",
        out_path,
        summary["images"],
        summary["masks_min"],
        summary["masks_median"],
        summary["masks_max"],
        summary["bytes_per_image"],
        summary["compression"],
    )
    return summary


def precompute_masks(
    prepared: Prepared,
    out_path: Path,
    image_ids: Sequence[str],
    pps: int,
    min_region_area: int,
    masks: MasksParams,
    sam: SamParams,
    where: str = "params.yaml",
    sam2: Sam2Params | None = None,
) -> dict[str, float]:
    """Check the settings, build the store attrs and run :func:`compute_mask_store` with the
    ``masks.generator`` generator (built only if some image needs it).

    ``prepared`` gives the image size and the original photos;
    ``where`` names the source of the settings in error messages.
    """
    image_size = prepared.image_size
    check_generator_name(masks.generator, f"{where}: masks.generator")
    check_mask_params(pps, min_region_area, image_size, where)
    if masks.workers < 1:
        raise InputError(f"{where}: masks.workers must be >= 1, got {masks.workers}")
    if not image_ids:
        raise InputError(f"{prepared.splits_path}: no images to compute masks for")
    sam2 = sam2 or Sam2Params()
    attrs = store_attrs(masks.generator, pps, min_region_area, image_size, masks, sam, sam2)
    originals = {k: Path(v) for k, v in prepared.sources.items()}

    settings = GeneratorSettings(pps, min_region_area, masks, sam, sam2, image_size)

    def make() -> MaskGenerator:
        return MASK_GENERATORS[masks.generator](settings)

    return compute_mask_store(
        prepared.root, out_path, image_ids, make, attrs, originals, masks.workers
    )
