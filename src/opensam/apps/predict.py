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

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from opensam.apps.predictions_csv import read_rows, write_rows
from opensam.errors import InputError
from opensam.images import load_rgb_and_size, read_image_size, resize_image, resize_label, save_png
from opensam.masks.generators import MaskGenerator
from opensam.model.aggregation import MaskInputs, collate_mask_inputs, prepare_mask_inputs
from opensam.runtime import atomic_path, write_json

log = logging.getLogger(__name__)

Mapper = Callable[..., Iterable[Any]]  # ``map`` or ``ThreadPoolExecutor.map``

LABELS_DIR, OVERLAYS_DIR = "labels", "overlays"
FAILED_NAME, SUMMARY_NAME = "failed.txt", "summary.json"
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
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = colors
    photo = Image.fromarray(np.ascontiguousarray(rgb))
    mixed = Image.blend(photo, Image.fromarray(palette[labels]), OVERLAY_ALPHA)  # C, 4x numpy
    has = labels < len(colors)
    if not has.all():
        mixed = Image.composite(mixed, photo, Image.fromarray(has.astype(np.uint8) * 255))
    return np.asarray(mixed)


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


def _try_load(photo: Photo, image_size: int) -> _Loaded | tuple[str, str]:
    """The loaded photo, or ``(path, reason)`` when it cannot be read."""
    try:
        return _load_photo(photo, image_size)
    except (InputError, OSError, ValueError, MemoryError) as exc:
        reason = str(exc).removeprefix(f"{photo.path}: ") or exc.__class__.__name__
        log.warning("%s: %s", photo.path, reason)
        return (str(photo.path), reason)


def infer_batch(
    model: nn.Module,
    items: Sequence[tuple[np.ndarray, Path | None]],
    masks: MaskGenerator | None,
    times: StageTimes | None = None,
    pmap: Mapper = map,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict a batch of ``(image (S, S, 3) uint8, original path or None)``.

    Returns labels (B, S, S) uint8 (argmax) and confidence (B, S, S) float32 (max probability).
    ``masks`` None = the per-pixel prediction. ``pmap`` maps the per-image mask work (a thread
    pool's ``map`` runs it in parallel).
    """
    times = times if times is not None else StageTimes()
    images = torch.from_numpy(np.stack([img for img, _ in items])).permute(0, 3, 1, 2).contiguous()
    pool = winner = None
    if masks is not None:
        start = time.perf_counter()
        grid_hw = model.grid_hw(images.shape[-1])  # type: ignore[operator]

        def mask_inputs(item: tuple[np.ndarray, Path | None]) -> MaskInputs:
            return prepare_mask_inputs(masks.generate(*item).masks, grid_hw)

        inputs = list(pmap(mask_inputs, items))
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


def predict_image(
    model: nn.Module,
    image: Path | np.ndarray,
    image_size: int,
    masks: MaskGenerator | None = None,
) -> np.ndarray:
    """Class ids (H, W) uint8 of one photo at its own size: what :func:`predict_photos` writes to
    ``labels/<id>.png``. A path is decoded as there (EXIF orientation, reduced JPEG decoding); an
    array is (H, W, 3) uint8 RGB. ``masks`` None = the per-pixel prediction."""
    if isinstance(image, np.ndarray):
        small, size_hw, path = resize_image(image, image_size), image.shape[:2], None
    else:
        loaded = _load_photo(Photo(Path(image).stem, Path(image)), image_size)
        small, size_hw, path = loaded.small, loaded.size_hw, loaded.photo.path
    model.eval()
    labels, _ = infer_batch(model, [(small, path)], masks)
    return resize_label(labels[0], (int(size_hw[0]), int(size_hw[1])))


def _save_image(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            save_png(array, tmp, compress_level=1)  # 2x faster; class maps stay small
        else:
            Image.fromarray(array).save(tmp, format="JPEG", quality=90)


def _write_photo(item: _Loaded, labels: np.ndarray, conf: np.ndarray, run: _Run) -> dict[str, Any]:
    """Write one photo's class map and overlay atomically; return its CSV row."""
    full = resize_label(labels, item.size_hw)
    small_overlay = resize_label(labels, item.overlay_rgb.shape[:2])
    _save_image(full, run.out_dir / LABELS_DIR / f"{item.photo.id}.png")
    _save_image(
        blend_overlay(item.overlay_rgb, small_overlay, run.colors),
        run.out_dir / OVERLAYS_DIR / f"{item.photo.id}.jpg",
    )
    pct = class_percentages(full, len(run.class_names))
    row: dict[str, Any] = {
        "id": item.photo.id,
        "path": str(item.photo.path),
        "width": item.size_hw[1],
        "height": item.size_hw[0],
    }
    row.update({f"pct_{n}": round(float(p), 4) for n, p in zip(run.class_names, pct, strict=True)})
    row["mean_confidence"] = round(float(conf.mean()), 6)
    row["low_conf_pct"] = round(100.0 * float((conf < run.low_conf).mean()), 4)
    return row


def is_done(out_dir: Path, photo: Photo, rows: Mapping[str, Any]) -> bool:
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
    workers: int | None = None,
) -> PredictResult:
    """Predict ``photos`` in batches into ``out_dir`` (layout in the module docstring).

    ``model``: (B, 3, S, S) float [0, 1] (+ pool_weights, winner) -> (B, C, S, S) log-probs,
    S = ``image_size``; ``colors`` (C, 3) uint8; ``masks`` None = per-pixel prediction. Photos
    with outputs and a CSV row are skipped unless ``overwrite``. Unreadable photos (and
    ``refused`` files) go to ``failed.txt`` and the rest go on. ``workers`` threads (default:
    torch's thread count) load, compute superpixels and write in parallel.
    """
    out_dir = Path(out_dir)
    try:
        rows = read_rows(out_dir, class_names)
    except InputError:
        if not overwrite:
            raise
        rows = {}
    todo = list(photos) if overwrite else [p for p in photos if not is_done(out_dir, p, rows)]
    if len(todo) < len(photos):
        log.info("skipping %d photo(s) already predicted in %s", len(photos) - len(todo), out_dir)
    run = _Run(out_dir, class_names, colors, image_size, masks, low_conf, failed=list(refused))
    model.eval()
    start = flushed = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, workers or torch.get_num_threads())) as pool:
            run.pmap = pool.map
            with tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar:
                for at in range(0, len(todo), batch_size):
                    rows.update(run.predict_chunk(model, todo[at : at + batch_size]))
                    bar.update(min(batch_size, len(todo) - at))
                    if time.perf_counter() - flushed > CSV_FLUSH_SECONDS:
                        write_rows(out_dir, rows.values(), class_names)
                        flushed = time.perf_counter()
    finally:
        write_rows(out_dir, rows.values(), class_names)
    with atomic_path(out_dir / FAILED_NAME) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in run.failed))
    if run.failed:
        log.warning("%d file(s) failed, listed in %s", len(run.failed), out_dir / FAILED_NAME)
    done = len(todo) - (len(run.failed) - len(refused))
    wanted = [rows[p.id] for p in photos if p.id in rows]
    seconds = time.perf_counter() - start
    return PredictResult(wanted, done, len(photos) - len(todo), run.failed, seconds, run.times)


@dataclass
class _Run:
    """Settings and accumulators of one :func:`predict_photos` call."""

    out_dir: Path
    class_names: Sequence[str]
    colors: np.ndarray
    image_size: int
    masks: MaskGenerator | None
    low_conf: float
    pmap: Mapper = map
    times: StageTimes = field(default_factory=StageTimes)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def predict_chunk(self, model: nn.Module, photos: Sequence[Photo]) -> dict[str, dict]:
        """Load, predict and write one batch; returns the new CSV rows by id."""
        t0 = time.perf_counter()
        loaded: list[_Loaded] = []
        for item in self.pmap(lambda p: _try_load(p, self.image_size), photos):
            if isinstance(item, _Loaded):
                loaded.append(item)
            else:
                self.failed.append(item)
        self.times.load += time.perf_counter() - t0
        if not loaded:
            return {}
        pairs = [(it.small, it.photo.path) for it in loaded]
        # a generator that opts in (thread_safe: superpixels, regions, demo_sam) runs per image
        # in the pool; SAM keeps per-image state
        mask_map = self.pmap if getattr(self.masks, "thread_safe", False) else map
        labels, conf = infer_batch(model, pairs, self.masks, self.times, mask_map)
        t0 = time.perf_counter()
        rows = self.pmap(
            lambda i: _write_photo(loaded[i], labels[i], conf[i], self), range(len(loaded))
        )
        new = {row["id"]: row for row in rows}
        self.times.write += time.perf_counter() - t0
        return new


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
    write_json(Path(out_dir) / SUMMARY_NAME, summary)


def score_class_maps(
    pred_dir: Path, gt_dir: Path, ids: Sequence[str], class_names: list[str]
) -> dict[str, Any] | None:
    """mIoU report (percent) of ``pred_dir/labels/<id>.png`` against ``gt_dir/<id>.png`` (mode L
    class ids, 255 ignored), each prediction resized (nearest) to its ground truth's size, plus
    ``images``, the number scored. None when no id has both files."""
    from opensam.eval.metrics import confusion_matrix, miou_report
    from opensam.images import read_label_png

    total, scored = np.zeros((len(class_names),) * 2, dtype=np.int64), 0
    for image_id in ids:
        gt_path, pred_path = gt_dir / f"{image_id}.png", pred_dir / LABELS_DIR / f"{image_id}.png"
        if gt_path.is_file() and pred_path.is_file():
            gt = read_label_png(gt_path)
            total += confusion_matrix(
                resize_label(read_label_png(pred_path), gt.shape), gt, len(class_names)
            )
            scored += 1
    return {"images": scored, **miou_report(total, class_names)} if scored else None
