"""Procedural "Lizards" photos: a lizard held by a hand over millimetre paper with a colour chart.

:func:`generate_demo` writes a CVAT *Segmentation Mask 1.1* export of labelled photos plus
``unlabelled/`` photos and their hidden ground truth ``unlabelled_gt/``. Each photo has its own
generator, ``np.random.default_rng([seed, kind, index])``, so the output is reproducible and the
photos render in parallel. :func:`~opensam.demo.scene.render_scene` draws one photo in memory.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from opensam.constants import IGNORE_INDEX
from opensam.demo.scene import BACKGROUND, BOARD, CLASS_NAMES, HAND, LIZARD, render_scene
from opensam.parallel.processes import process_map
from opensam.runtime import atomic_path

log = logging.getLogger(__name__)

# CVAT labelmap: unannotated paper is background (black); paper scraps have a label of their own
# that the importer maps to IGNORE_INDEX, since it is not one of the params classes.
LABELMAP: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "lizard": (250, 220, 40),
    "hand": (40, 200, 60),
    "color board": (40, 90, 230),
    "scrap": (255, 255, 255),
}
_LABEL_IDS = {"background": BACKGROUND, "lizard": LIZARD, "hand": HAND, "color board": BOARD}
_PNG_FLAGS = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]  # flat colours: fast, small


def label_to_rgb(label: np.ndarray) -> np.ndarray:
    """Class ids (H, W) uint8 -> CVAT colour mask (H, W, 3) uint8 in :data:`LABELMAP` colours."""
    lut = np.zeros((256, 3), np.uint8)
    for name, rgb in LABELMAP.items():
        lut[_LABEL_IDS.get(name, IGNORE_INDEX)] = rgb
    return np.take(lut, label, axis=0)


def write_labelmap(path: Path) -> None:
    """Write a CVAT ``labelmap.txt``: the CVAT header, then ``name:r,g,b::`` lines."""
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in LABELMAP.items()]
    path.write_text("\n".join(lines) + "\n")


# Photo kinds: (id prefix, photo folder, colour mask folder); kind 0 is labelled.
_KINDS = (("lz", "JPEGImages", "SegmentationClass"), ("ul", "unlabelled", "unlabelled_gt"))


_Task = tuple[Path, int, int, int, int, int]  # out folder, seed, kind, index, width, height


def _write_photo(task: _Task) -> np.ndarray:
    """Render photo ``index`` of ``kind``; write its JPEG and colour PNG; return its histogram."""
    root, seed, kind, index, width, height = task
    rng = np.random.default_rng([seed, kind, index])
    img, label = render_scene(rng, width, height)
    prefix, photos, masks = _KINDS[kind]
    Image.fromarray(img).save(root / photos / f"{prefix}{index:04d}.jpg", quality=90)
    ok, buf = cv2.imencode(".png", label_to_rgb(label)[..., ::-1], _PNG_FLAGS)  # BGR in
    if not ok:
        raise OSError(f"{root / masks}: PNG encoding failed")
    (root / masks / f"{prefix}{index:04d}.png").write_bytes(buf.tobytes())
    return np.bincount(label.ravel(), minlength=256)


def generate_demo(
    out_dir: Path,
    labelled: int,
    unlabelled: int,
    seed: int,
    width: int = 1024,
    height: int = 683,
    workers: int | None = None,
) -> None:
    """Write the demo data set to ``out_dir``, replacing it atomically.

    Contents: a CVAT Segmentation Mask 1.1 export (``labelmap.txt``,
    ``ImageSets/Segmentation/default.txt``, ``JPEGImages/lz0000.jpg``.. and
    ``SegmentationClass/lz0000.png``.., RGB colour masks), plus ``unlabelled/ul0000.jpg``.. and
    their ground truth ``unlabelled_gt/ul0000.png``.. in the same colours. The files depend only
    on the arguments before ``workers`` (default: min(2, CPU count) processes). With more than
    one worker, a calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    workers = min(2, multiprocessing.cpu_count()) if workers is None else workers
    counts = np.zeros(256, np.int64)
    with atomic_path(out_dir) as tmp:
        for sub in ("ImageSets/Segmentation", *_KINDS[0][1:], *_KINDS[1][1:]):
            (tmp / sub).mkdir(parents=True)
        write_labelmap(tmp / "labelmap.txt")
        ids = "".join(f"lz{i:04d}\n" for i in range(labelled))
        (tmp / "ImageSets/Segmentation/default.txt").write_text(ids)
        tasks = [(tmp, seed, 0, i, width, height) for i in range(labelled)]
        tasks += [(tmp, seed, 1, i, width, height) for i in range(unlabelled)]
        bar = tqdm(
            process_map(_write_photo, tasks, workers, ordered=False, chunksize=4),
            total=len(tasks),
            desc="demo photos",
            unit="img",
        )
        for hist in bar:
            counts += hist
    frac = counts[[*range(4), IGNORE_INDEX]] / max(1, counts.sum())
    shares = ", ".join(f"{n} {f:.1%}" for n, f in zip([*CLASS_NAMES, "ignore"], frac, strict=True))
    log.info(
        "%s: %d labelled + %d unlabelled photos; pixels: %s", out_dir, labelled, unlabelled, shares
    )
