"""The Python API for notebooks, exposed as ``opensam.load_model``, ``opensam.predict_image`` and
``opensam.read_mask_store``: the code paths of ``opensam predict`` and of the mask store, not
copies of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from opensam.apps.predict import predict_image as predict_one
from opensam.apps.predict_setup import (
    MaskChoice,
    build_mask_generator,
    choose_masks,
    overlay_colors,
)
from opensam.config import Params, load_params
from opensam.errors import InputError
from opensam.images import to_rgb
from opensam.masks.generators import MaskGenerator
from opensam.masks.store import MaskStore
from opensam.model.segmenter import OpenSamModel, load_checkpoint
from opensam.parallel.context import resolve_device

ImageInput = str | Path | np.ndarray | Image.Image


@dataclass(frozen=True)
class Predictor:
    """A loaded checkpoint, ready for :func:`predict_image`.

    ``model``: the network in eval mode; ``masks``: the region-mask generator (None = per-pixel
    prediction) chosen by ``mask_choice``; ``colors``: (C, 3) uint8 overlay colours, as
    ``opensam predict`` draws them; ``meta``: the checkpoint without its weights.
    """

    model: OpenSamModel
    masks: MaskGenerator | None
    mask_choice: MaskChoice
    colors: np.ndarray
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        """Class names; a class map's id i is ``classes[i]``."""
        return list(self.meta["classes"])

    @property
    def image_size(self) -> int:
        """The side of the square the model sees (photos are squashed to it)."""
        return int(self.meta["image_size"])


def load_model(
    checkpoint: str | Path,
    masks: str | None = None,
    params: str | Path | None = None,
    device: str | None = None,
) -> Predictor:
    """Load a trained checkpoint (``models/student.pt``, ``models/teacher.pt``).

    ``masks``: a generator name (``none`` = per-pixel); default: the generator the checkpoint
    was trained with, as ``opensam predict`` chooses. ``params``: a params.yaml for the mask
    settings not recorded in the checkpoint and its class check (default: the built-in defaults,
    no class check). ``device``: ``cpu``, ``cuda``, ``auto`` (default: cpu).
    """
    p = Params() if params is None else load_params(params)
    expected = p.class_names if params is not None else None
    model, meta = load_checkpoint(checkpoint, expected, classes_from=str(params))
    if device is not None:
        model = model.to(resolve_device(device))
    size = int(meta["image_size"])
    choice = choose_masks(meta, p, masks, checkpoint=str(checkpoint))
    generator = build_mask_generator(choice, p.masks, p.sam, size, p.sam2)
    return Predictor(model, generator, choice, overlay_colors(p, meta), meta)


def as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a Pillow image or an array (gray, RGB, RGBA, 16-bit, float), by
    the rules photos are read with (:mod:`opensam.images`); no EXIF orientation is applied."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        return array
    try:
        return to_rgb(Image.fromarray(array))
    except (TypeError, ValueError) as exc:
        what = f"{array.dtype} array of shape {array.shape}"
        raise InputError(f"cannot use a {what} as an image ({exc})") from None


def predict_image(predictor: Predictor, image: ImageInput) -> np.ndarray:
    """Class ids (H, W) uint8 at the image's own size, as ``opensam predict`` writes them.

    ``image``: a path (decoded as ``opensam predict`` does, EXIF orientation applied), a Pillow
    image or an array (:func:`as_rgb`). Region masks come from ``predictor.masks``.
    """
    source = Path(image) if isinstance(image, str | Path) else as_rgb(image)
    return predict_one(predictor.model, source, predictor.image_size, predictor.masks)


def read_mask_store(path: str | Path) -> MaskStore:
    """Open a finished mask store (``data/masks.h5``) for reading: ``.ids()``, ``.read(id)``
    (a MaskSet of (n, H, W) bool masks, largest first), ``.read_winner(id)``, ``.attrs``.
    Raises :class:`InputError` when the file is missing or not a mask store."""
    store = MaskStore(path)
    store.image_shape  # noqa: B018  (opens it: a bad file fails here, not at the first read)
    return store
