"""Label new photos with a trained model: class maps, overlays and per-photo statistics.

A prediction folder (``opensam predict INPUT --out DIR`` and the ``predict`` stage)::

    labels/<id>.png    mode L uint8 class ids at the photo's ORIGINAL size (nearest upscaling)
    overlays/<id>.jpg  the photo blended with the class colours (longer side <= 2048 px)
    predictions.csv    per photo: id, path, width, height, pct_<class> (pixel share, %),
                       mean_confidence (mean max probability, 0..1), low_conf_pct (% of pixels
                       with max probability < low_conf); confidences at the model's resolution
    failed.txt         photos of the last run that could not be used: ``path<TAB>reason``
    summary.json       classes, colours, counts, images/s and time shares of the last run

Photos are squashed to the model's ``image_size`` square (as ``prepare`` does), region masks are
computed on that image, and the class map is upscaled back. Ids are the paths relative to the
input folder (a list file: to its entries' common folder) without extension, ``/`` → ``__``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from opensam.config import MasksParams, SamParams
from opensam.errors import InputError
from opensam.images import (
    load_rgb_and_size,
    read_image_size,
    resize_image,
    resize_label,
    save_png,
)
from opensam.mask_generators import MaskGenerator, build_generator
from opensam.runtime import atomic_path

log = logging.getLogger(__name__)

LABELS_DIR, OVERLAYS_DIR = "labels", "overlays"
CSV_NAME, FAILED_NAME, SUMMARY_NAME = "predictions.csv", "failed.txt", "summary.json"
OVERLAY_ALPHA = 0.5  # share of the class colour in an overlay pixel
MAX_OVERLAY_SIDE = 2048  # overlays of larger photos are downscaled (class maps never are)
CSV_FLUSH_SECONDS = 30.0  # during a run the CSV is rewritten at most this often (and at the end)


@dataclass(frozen=True)
class Photo:
    """One input photo: its output id and its path."""

    id: str
    path: Path


@dataclass
class StageTimes:
    """Seconds spent loading, computing masks, running the model and writing outputs."""

    load: float = 0.0
    masks: float = 0.0
    model: float = 0.0
    write: float = 0.0

    def shares(self) -> dict[str, float]:
        """Percent of the summed time per part."""
        total = sum(asdict(self).values()) or 1.0
        return {k: round(100.0 * v / total, 2) for k, v in asdict(self).items()}


@dataclass
class PredictResult:
    """What a :func:`predict_photos` run did; ``rows`` are the CSV rows of the requested photos."""

    rows: list[dict[str, Any]]
    processed: int
    skipped: int
    failed: list[tuple[str, str]]
    seconds: float
    times: StageTimes

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def blend_overlay(rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Photo (H, W, 3) uint8 blended with the colours (C, 3) uint8 of class map (H, W) uint8.

    Pixels whose id has no colour (255) keep the photo. Returns (H, W, 3) uint8.
    """
    palette = np.zeros((256, 3), dtype=np.float32)
    palette[: len(colors)] = colors
    mixed = (1.0 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * palette[labels]
    return np.where((labels < len(colors))[..., None], mixed, rgb).round().astype(np.uint8)


def class_percentages(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel share (%) of each class id 0..C-1 in a (H, W) uint8 class map: (C,) float64."""
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes]
    return 100.0 * counts / max(1, labels.size)


@dataclass
class _Loaded:
    photo: Photo
    small: np.ndarray  # (S, S, 3) uint8, the model input
    overlay_rgb: np.ndarray  # (h, w, 3) uint8, the photo at overlay size
    size_hw: tuple[int, int]  # original (H, W) after EXIF orientation


def _load_photo(photo: Photo, image_size: int) -> _Loaded:
    """Decode a photo (big JPEGs at a reduced DCT scale) to the model and overlay sizes."""
    size_hw = read_image_size(photo.path, str(photo.path))
    scale = min(1.0, MAX_OVERLAY_SIDE / max(size_hw))
    ov_hw = (max(1, round(size_hw[0] * scale)), max(1, round(size_hw[1] * scale)))
    need = (max(image_size, ov_hw[0]), max(image_size, ov_hw[1]))
    rgb, size_hw = load_rgb_and_size(photo.path, str(photo.path), min_size=need)
    return _Loaded(photo, resize_image(rgb, image_size), resize_image(rgb, ov_hw), size_hw)


def _load_batch(
    photos: Sequence[Photo], image_size: int, failed: list[tuple[str, str]], times: StageTimes
) -> list[_Loaded]:
    start, loaded = time.perf_counter(), []
    for photo in photos:
        try:
            loaded.append(_load_photo(photo, image_size))
        except (InputError, OSError, ValueError, MemoryError) as exc:
            reason = str(exc).removeprefix(f"{photo.path}: ") or exc.__class__.__name__
            log.warning("%s: %s", photo.path, reason)
            failed.append((str(photo.path), reason))
    times.load += time.perf_counter() - start
    return loaded


def infer_batch(
    model: nn.Module,
    items: Sequence[tuple[np.ndarray, Path | None]],
    masks: MaskGenerator | None,
    times: StageTimes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict a batch of ``(image (S, S, 3) uint8, original path or None)``.

    Returns labels (B, S, S) uint8 (argmax) and confidence (B, S, S) float32 (max probability).
    ``masks`` None = the per-pixel prediction.
    """
    from opensam.aggregation import collate_mask_inputs, prepare_mask_inputs

    times = times if times is not None else StageTimes()
    images = torch.from_numpy(np.stack([img for img, _ in items])).permute(0, 3, 1, 2)
    pool = winner = None
    if masks is not None:
        start = time.perf_counter()
        grid_hw = model.grid_hw(images.shape[-1])  # type: ignore[operator]
        inputs = [prepare_mask_inputs(masks.generate(i, o).masks, grid_hw) for i, o in items]
        pool, winner = collate_mask_inputs(inputs)
        times.masks += time.perf_counter() - start
    start = time.perf_counter()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode():
        log_probs = model(
            images.to(device).float().div(255.0),
            pool_weights=None if pool is None else pool.to(device),
            winner=None if winner is None else winner.long().to(device),
        )
        conf, labels = log_probs.float().exp().max(dim=1)
    times.model += time.perf_counter() - start
    return labels.to(torch.uint8).cpu().numpy(), conf.cpu().numpy()


def _save_image(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            save_png(array, tmp)
        else:
            Image.fromarray(array).save(tmp, format="JPEG", quality=90)


def _write_photo(
    item: _Loaded,
    labels: np.ndarray,
    conf: np.ndarray,
    out_dir: Path,
    class_names: Sequence[str],
    colors: np.ndarray,
    low_conf: float,
) -> dict[str, Any]:
    """Write one photo's class map and overlay atomically; return its CSV row."""
    full = resize_label(labels, item.size_hw)
    small_overlay = resize_label(labels, item.overlay_rgb.shape[:2])
    _save_image(full, out_dir / LABELS_DIR / f"{item.photo.id}.png")
    _save_image(
        blend_overlay(item.overlay_rgb, small_overlay, colors),
        out_dir / OVERLAYS_DIR / f"{item.photo.id}.jpg",
    )
    pct = class_percentages(full, len(class_names))
    row: dict[str, Any] = {
        "id": item.photo.id,
        "path": str(item.photo.path),
        "width": item.size_hw[1],
        "height": item.size_hw[0],
    }
    row.update({f"pct_{n}": round(float(p), 4) for n, p in zip(class_names, pct, strict=True)})
    row["mean_confidence"] = round(float(conf.mean()), 6)
    row["low_conf_pct"] = round(100.0 * float((conf < low_conf).mean()), 4)
    return row


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of ``predictions.csv``."""
    pct = [f"pct_{name}" for name in class_names]
    return ["id", "path", "width", "height", *pct, "mean_confidence", "low_conf_pct"]


def read_rows(pred_dir: Path, class_names: Sequence[str] | None = None) -> dict[str, dict]:
    """Rows of ``pred_dir/predictions.csv`` by id ({} if absent). With ``class_names``, a CSV
    whose columns differ raises :class:`InputError`."""
    path = Path(pred_dir) / CSV_NAME
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if class_names is not None and reader.fieldnames != csv_columns(class_names):
            raise InputError(f"{path}: written for other classes; use --overwrite or a new folder")
        return {row["id"]: row for row in reader if row.get("id")}


def write_rows(
    out_dir: Path, rows: Iterable[Mapping[str, Any]], class_names: Sequence[str]
) -> None:
    """Rewrite ``out_dir/predictions.csv`` atomically, rows sorted by id."""
    with atomic_path(Path(out_dir) / CSV_NAME) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(class_names), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: str(r["id"])))


def _is_done(out_dir: Path, photo: Photo, rows: Mapping[str, Any]) -> bool:
    return (
        photo.id in rows
        and (out_dir / LABELS_DIR / f"{photo.id}.png").is_file()
        and (out_dir / OVERLAYS_DIR / f"{photo.id}.jpg").is_file()
    )


def predict_photos(
    model: nn.Module,
    photos: Sequence[Photo],
    out_dir: Path,
    class_names: Sequence[str],
    colors: np.ndarray,
    image_size: int,
    masks: MaskGenerator | None = None,
    batch_size: int = 8,
    low_conf: float = 0.5,
    overwrite: bool = False,
    refused: Sequence[tuple[str, str]] = (),
) -> PredictResult:
    """Predict ``photos`` in batches into ``out_dir`` (layout in the module docstring).

    ``model``: (B, 3, S, S) float [0, 1] (+ pool_weights, winner) -> (B, C, S, S) log-probs,
    S = ``image_size``; ``colors`` (C, 3) uint8; ``masks`` None = per-pixel prediction. Photos
    with outputs and a CSV row are skipped unless ``overwrite``. Unreadable photos (and
    ``refused`` files) go to ``failed.txt`` and the rest go on.
    """
    out_dir = Path(out_dir)
    try:
        rows = read_rows(out_dir, class_names)
    except InputError:
        if not overwrite:
            raise
        rows = {}
    todo = list(photos) if overwrite else [p for p in photos if not _is_done(out_dir, p, rows)]
    if len(todo) < len(photos):
        log.info("skipping %d photo(s) already predicted in %s", len(photos) - len(todo), out_dir)
    failed, times, n_refused = list(refused), StageTimes(), len(refused)
    model.eval()
    start = flushed = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar:
            for at in range(0, len(todo), batch_size):
                chunk = todo[at : at + batch_size]
                loaded = _load_batch(chunk, image_size, failed, times)
                if loaded:
                    pairs = [(it.small, it.photo.path) for it in loaded]
                    labels, conf = infer_batch(model, pairs, masks, times)
                    t0 = time.perf_counter()
                    for i, it in enumerate(loaded):
                        rows[it.photo.id] = _write_photo(
                            it, labels[i], conf[i], out_dir, class_names, colors, low_conf
                        )
                    times.write += time.perf_counter() - t0
                bar.update(len(chunk))
                if time.perf_counter() - flushed > CSV_FLUSH_SECONDS:
                    write_rows(out_dir, rows.values(), class_names)
                    flushed = time.perf_counter()
    finally:
        write_rows(out_dir, rows.values(), class_names)
    with atomic_path(out_dir / FAILED_NAME) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in failed))
    if failed:
        log.warning("%d file(s) failed, listed in %s", len(failed), out_dir / FAILED_NAME)
    done = len(todo) - (len(failed) - n_refused)
    wanted = [rows[p.id] for p in photos if p.id in rows]
    return PredictResult(
        wanted, done, len(photos) - len(todo), failed, time.perf_counter() - start, times
    )


def build_summary(
    result: PredictResult,
    class_names: Sequence[str],
    colors: np.ndarray,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` mapping of a run; class fractions and confidences are means over
    photos (each photo counts once); ``info`` adds keys (checkpoint, masks, ...)."""
    rows = result.rows

    def mean(key: str) -> float | None:
        return round(float(np.mean([float(r[key]) for r in rows])), 4) if rows else None

    return {
        "classes": list(class_names),
        "colors": np.asarray(colors).astype(int).tolist(),
        **(info or {}),
        "images": len(rows),
        "processed": result.processed,
        "skipped": result.skipped,
        "failed": [path for path, _ in result.failed],
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 3),
        "time_share_pct": result.times.shares(),
        "mean_confidence": mean("mean_confidence"),
        "low_conf_pct": mean("low_conf_pct"),
        "class_fractions": {name: mean(f"pct_{name}") for name in class_names},
    }


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    """Write ``out_dir/summary.json`` atomically."""
    with atomic_path(Path(out_dir) / SUMMARY_NAME) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")


def build_mask_generator(
    name: str, pps: int, min_region_area: int, masks: MasksParams, sam: SamParams, image_size: int
) -> MaskGenerator | None:
    """The region-mask generator ``name`` (``sam`` | ``superpixels``) with the training settings,
    making masks at ``image_size``², or None for ``none`` (the per-pixel prediction)."""
    return (
        None
        if name == "none"
        else build_generator(name, pps, min_region_area, masks, sam, image_size)
    )
