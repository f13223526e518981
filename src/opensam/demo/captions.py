"""An image-caption corpus drawn with the demo scene generator, for the demo CLIP's pretraining.

Scenes come from :func:`opensam.demo_scene.render_scene` under their own seed (generator key
``[seed, 2, index]``: kinds 0 and 1 are the demo's labelled and unlabelled photos, so no corpus
image is ever one of them). Each scene is rendered at ``render_hw`` and squashed to
``scene_size``² the way ``prepare`` squashes photos, so objects have the scale they have at
evaluation. :func:`sample_crop` cuts a random view out of a scene and writes a caption of what is
visible in it, the way a web caption would: the objects (most visible first), their colour, where
they lie, whether they are partly cut off. The scene generator knows what it drew; that knowledge
picks the words, and it never reaches the training loss as a pixel label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from opensam.demo.scene import BACKGROUND, BOARD, HAND, LIZARD, render_scene
from opensam.parallel.processes import process_map

log = logging.getLogger(__name__)

CORPUS_KIND = 2  # generator key [seed, 2, index]; the demo's photos use kinds 0 and 1
_SHOW = 0.12  # an object is named when it covers this fraction of a crop ...
_SHOW_PART = 0.5  # ... or this fraction of itself lies in the crop (and at least 2% of it)
PROMPT_SHARE = 0.5  # share of object names given as the class prompt itself ("a lizard")

# Names per object; the first is the class prompt of params.yaml, kept verbatim.
_NAMES: dict[int, tuple[str, ...]] = {
    LIZARD: ("a lizard", "a small lizard", "a {c} lizard", "a {c} lizard", "a reptile"),
    HAND: ("a human hand", "a hand", "a {c} hand", "a person's hand", "human fingers"),
    BOARD: ("a color board", "a colour chart", "a color checker", "a {c} color board"),
    BACKGROUND: ("a background", "millimetre paper", "graph paper", "{c} graph paper"),
}
# The demo's class prompts (params.yaml), in class-id order: the held-out accuracy's labels.
CLASS_PROMPTS = tuple(_NAMES[c][0] for c in (LIZARD, HAND, BOARD, BACKGROUND))
_PARTS: dict[int, tuple[str, ...]] = {
    LIZARD: ("part of a lizard", "the tail of a lizard", "a {c} lizard, partly visible"),
    HAND: ("part of a hand", "the fingers of a hand", "part of a {c} hand"),
    BOARD: ("part of a color board", "a corner of a colour chart"),
    BACKGROUND: ("a background",),
}
_PREFIX = ("", "", "a photo of ", "a close-up of ", "a cropped photo of ", "an image of ")
_WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
_LIZARD_COLOURS = {
    "brown": (120, 90, 60),
    "olive": (100, 105, 60),
    "grey": (120, 115, 100),
    "green": (80, 125, 65),
    "dark": (70, 65, 55),
}
_SKIN = {"pale": 215, "light": 185, "tanned": 150, "brown": 115, "dark": 80}
_INKS = {
    "orange": (226, 120, 60),
    "green": (96, 166, 118),
    "blue": (96, 138, 200),
    "red": (190, 104, 88),
    "grey": (140, 140, 140),
}


@dataclass(frozen=True)
class Scene:
    """One squashed scene: RGB (S, S, 3) uint8, what the generator drew (S, S) uint8, and
    colour words per object (the lizard's, the skin tone, the chart frame, the grid ink)."""

    image: np.ndarray
    drawn: np.ndarray
    colours: dict[int, str]


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    ref = np.array([table[n] for n in names], np.float32)
    return names[int(np.argmin(((ref - rgb) ** 2).sum(1)))]


def _colour_words(image: np.ndarray, drawn: np.ndarray) -> dict[int, str]:
    words: dict[int, str] = {}
    for cls in (LIZARD, HAND, BOARD):
        px = image[drawn == cls].astype(np.float32)
        if len(px) == 0:
            continue
        mean = px.mean(0)
        if cls == LIZARD:
            words[cls] = _nearest(mean, _LIZARD_COLOURS)
        elif cls == HAND:
            lum = float(mean.mean())
            words[cls] = min(_SKIN, key=lambda n: abs(_SKIN[n] - lum))
        else:
            words[cls] = "black" if mean.mean() < 90 else ("white" if mean.mean() > 150 else "grey")
    paper = image[drawn == BACKGROUND].astype(np.float32)
    if len(paper):
        dark = paper[paper.sum(1) <= np.quantile(paper.sum(1), 0.05)].mean(0)
        tint = np.median(paper, 0)
        inks = {n: np.array(v, np.float32) - tint for n, v in _INKS.items()}
        d = dark - tint  # the grid lines pull the paper's tint towards their ink
        cos = {
            n: float(d @ v) / (np.linalg.norm(d) * np.linalg.norm(v) + 1e-6)
            for n, v in inks.items()
        }
        words[BACKGROUND] = max(cos, key=lambda n: cos[n])
    return words


def render_corpus_scene(
    seed: int, index: int, scene_size: int, render_hw: tuple[int, int] = (342, 512)
) -> Scene:
    """Scene ``index`` of the corpus with seed ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, CORPUS_KIND, index])
    img, label = render_scene(rng, render_hw[1], render_hw[0])
    size = (scene_size, scene_size)
    image = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    drawn = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return Scene(image, drawn, _colour_words(image, drawn))


def _render_task(task: tuple[int, int, int, tuple[int, int]]) -> Scene:
    return render_corpus_scene(*task)


def render_corpus(
    seed: int,
    count: int,
    scene_size: int,
    workers: int = 1,
    start: int = 0,
    render_hw: tuple[int, int] = (342, 512),
) -> list[Scene]:
    """Scenes ``start`` .. ``start + count - 1`` (in index order), rendered at ``render_hw`` in
    ``workers`` processes if > 1, squashed to ``scene_size``²."""
    tasks = [(seed, i, scene_size, render_hw) for i in range(start, start + count)]
    return list(process_map(_render_task, tasks, workers, min_tasks=8))


def _where(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    dx, dy = xs.mean() / w - 0.5, ys.mean() / h - 0.5
    if max(abs(dx), abs(dy)) < 0.15:
        return _WHERE[4]
    if abs(dx) > abs(dy):
        return _WHERE[0] if dx < 0 else _WHERE[1]
    return _WHERE[2] if dy < 0 else _WHERE[3]


def _name(rng: np.random.Generator, cls: int, part: bool, colours: dict[int, str]) -> str:
    forms = _PARTS[cls] if part else _NAMES[cls]
    form = forms[0] if rng.random() < PROMPT_SHARE else forms[int(rng.integers(len(forms)))]
    return form.format(c=colours.get(cls, ""))


def caption(
    rng: np.random.Generator, drawn: np.ndarray, whole: np.ndarray, colours: dict[int, str]
) -> str:
    """A caption of a crop: ``drawn`` (h, w) what it shows, ``whole`` (4,) the scene's pixel
    count per object (to tell a partial view), ``colours`` the colour words."""
    counts = np.bincount(drawn.ravel(), minlength=256)[:4]
    frac = counts / max(1, drawn.size)
    share = counts / np.maximum(whole, 1)
    shown = [
        c
        for c in (LIZARD, HAND, BOARD)
        if frac[c] >= _SHOW or (share[c] >= _SHOW_PART and frac[c] >= 0.02)
    ]
    shown.sort(key=lambda c: -frac[c])
    if not shown:
        return _name(rng, BACKGROUND, False, colours)
    names = [_name(rng, c, bool(share[c] < 0.6 and frac[c] < 0.5), colours) for c in shown]
    if len(shown) == 1:
        text = _PREFIX[int(rng.integers(len(_PREFIX)))] + names[0]
        extra = int(rng.integers(4))
        if extra == 1:
            text += " " + _where(drawn == shown[0])
        elif extra == 2 and frac[BACKGROUND] > 0.3:
            paper = _NAMES[BACKGROUND][1 + int(rng.integers(3))]
            text += " on " + paper.format(c=colours.get(BACKGROUND, ""))
        return text
    if shown[:2] in ([HAND, LIZARD], [LIZARD, HAND]) and rng.random() < 0.5:
        lz, hd = names[shown.index(LIZARD)], names[shown.index(HAND)]
        text = f"{hd} holding {lz}" if shown[0] == HAND else f"{lz} held by {hd}"
        rest = names[2:]
    else:
        text, rest = names[0] + (" and " if len(names) == 2 else ", ") + names[1], names[2:]
    if rest:
        text += " and " + rest[0]
    return text


def sample_crop(
    rng: np.random.Generator,
    scene: Scene,
    out_size: int,
    min_frac: float = 0.25,
    focus: float = 0.5,
    max_frac: float = 1.0,
) -> tuple[np.ndarray, str]:
    """A random square crop of ``scene`` resized to ``out_size``², and its caption.

    The crop side is a fraction in [min_frac, max_frac] of the scene's (log-uniform); with
    probability ``focus`` it is centred on a random pixel of a random object (so single objects,
    the lizard alone too, are often the main subject), else placed uniformly. Flipped at random.
    """
    size = scene.image.shape[0]
    side = max(8, round(size * float(np.exp(rng.uniform(np.log(min_frac), np.log(max_frac))))))
    if rng.random() < focus:
        cls = int(rng.integers(4))
        ys, xs = np.nonzero(scene.drawn == cls)
        if len(ys):
            j = int(rng.integers(len(ys)))
            cy, cx = int(ys[j]), int(xs[j])
        else:
            cy, cx = size // 2, size // 2
        y0 = int(np.clip(cy - side // 2, 0, size - side))
        x0 = int(np.clip(cx - side // 2, 0, size - side))
    else:
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    crop = scene.image[y0 : y0 + side, x0 : x0 + side]
    drawn = scene.drawn[y0 : y0 + side, x0 : x0 + side]
    if rng.random() < 0.5:
        crop, drawn = crop[:, ::-1], drawn[:, ::-1]
    whole = np.bincount(scene.drawn.ravel(), minlength=256)[:4]
    text = caption(rng, drawn, whole, scene.colours)
    interp = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    image = cv2.resize(np.ascontiguousarray(crop), (out_size, out_size), interpolation=interp)
    return image, text


def object_crop(
    rng: np.random.Generator, scene: Scene, cls: int, out_size: int, purity: float = 0.6
) -> np.ndarray | None:
    """A crop resized to ``out_size``² in which object ``cls`` covers at least ``purity`` and no
    other named object 7%, or None if none is found in 30 tries (held-out image classification)."""
    size = scene.image.shape[0]
    ys, xs = np.nonzero(scene.drawn == cls)
    if not len(ys):
        return None
    for _ in range(30):
        side = int(rng.integers(size // 8, size // 3))
        j = int(rng.integers(len(ys)))
        y0 = int(np.clip(ys[j] - side // 2, 0, size - side))
        x0 = int(np.clip(xs[j] - side // 2, 0, size - side))
        drawn = scene.drawn[y0 : y0 + side, x0 : x0 + side]
        frac = np.bincount(drawn.ravel(), minlength=256)[:4] / drawn.size
        others = [frac[c] for c in (LIZARD, HAND, BOARD) if c != cls]
        if frac[cls] >= purity and max(others) < _SHOW:
            crop = np.ascontiguousarray(scene.image[y0 : y0 + side, x0 : x0 + side])
            return cv2.resize(crop, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
    return None
