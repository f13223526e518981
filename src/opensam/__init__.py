"""opensam: OpenCLIP + SAM semi-supervised semantic segmentation.

From Python (a notebook)::

    import opensam

    predictor = opensam.load_model("models/student.pt")  # the masks it was trained with
    labels = opensam.predict_image(predictor, "photo.jpg")  # (H, W) uint8 class ids
    predictor.classes  # the name of each id
    store = opensam.read_mask_store("data/masks.h5")  # store.ids(), store.read(image_id)

The names are loaded on first use (:mod:`opensam.apps.api`), so ``import opensam`` stays cheap:
every stage and the console script import this package first.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (about 20 ms)
if TYPE_CHECKING:
    from typing import Any

    from opensam.apps.api import Predictor, load_model, predict_image, read_mask_store

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__", "load_model", "predict_image", "read_mask_store"]
_LAZY = ("Predictor", "load_model", "predict_image", "read_mask_store")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'opensam' has no attribute {name!r}")
    from opensam.apps import api

    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
