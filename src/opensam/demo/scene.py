"""Drawing of one procedural "Lizards" photo: millimetre paper, a lizard, a hand, a colour chart.

:func:`render_scene` draws the photo and its label in memory, using only the generator it is
given: it lays out the lizard, the gripping hand, the colour chart and paper scraps, then paints
paper, chart, shadows, lizard and hand and finishes with lighting, grain and blur.
:mod:`opensam.demo.dataset` writes such photos as a CVAT export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

from opensam.constants import IGNORE_INDEX

CLASS_NAMES = ("lizard", "hand", "color board", "background")  # class ids 0..3
LIZARD, HAND, BOARD, BACKGROUND = range(4)
_REF_AREA = 1024 * 683  # sizes below are in pixels of a 1024x683 photo
_FRAC_LO = np.array([0.05, 0.05, 0.045, 0.35])  # class pixel fractions a layout must meet
_FRAC_HI = np.array([0.16, 0.16, 0.12, 0.85])
_NAIL = 10  # hand part id of fingernails


def _rgb_table(text: str) -> np.ndarray:
    return np.array(text.split(), np.float32).reshape(-1, 3)


_PAPER_TINTS = _rgb_table("246 244 236  240 233 212  233 237 226  228 214 186  236 232 228")
_GRID_INKS = _rgb_table("226 120 60  96 166 118  96 138 200  190 104 88  140 140 140")
_LIZARD_RGB = _rgb_table("112 86 58  96 104 58  122 112 92  78 128 62  140 96 60  74 68 56")
_SKIN_TONES = _rgb_table("240 206 182  226 174 142  200 142 106  164 112 80  122 82 58  86 58 44")
_CHART_RGB = _rgb_table(  # the 24 ColorChecker patches (sRGB), row by row
    "115 82 68  194 150 130  98 122 157  87 108 67  133 128 177  103 189 170 "
    "214 126 44  80 91 166  193 90 99  94 60 108  157 188 64  224 163 46 "
    "56 61 150  70 148 73  175 54 60  231 199 31  187 86 149  8 133 161 "
    "243 243 242  200 200 200  160 160 160  122 122 121  85 85 85  52 52 52"
)

Points = list[tuple[float, float]]
Rng = np.random.Generator


@dataclass
class _Layout:
    """Geometry of one photo; all masks are (H, W)."""

    label: np.ndarray  # uint8 class ids, IGNORE_INDEX on scraps
    lizard: np.ndarray  # bool, the whole lizard (the hand is painted over it)
    pattern: np.ndarray  # uint8: 1 dorsal band, 2 dark spot, 3 light spot, 4 eye
    hand: np.ndarray  # uint8 part ids: 0 none, 1 arm and palm, 2 thumb, 3..6 fingers, _NAIL
    chart: list[tuple[Points, tuple[int, int, int]]]  # frame, then patches
    body_width: float  # px
    finger_width: float  # px


def _unit(a: float) -> np.ndarray:
    return np.array([math.cos(a), math.sin(a)])


def _pts(arr: np.ndarray) -> Points:
    return [(float(x), float(y)) for x, y in arr]


def _disc(draw: ImageDraw.ImageDraw, c: np.ndarray, r: float, fill: int) -> None:
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill)


def _capsule(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: float, fill: int) -> None:
    """A thick polyline with round joints and ends (PIL lines have square ends)."""
    draw.line(_pts(pts), fill=fill, width=max(1, round(width)), joint="curve")
    for p in pts:
        _disc(draw, p, width / 2, fill)


def _ribbon(pts: np.ndarray, normal: np.ndarray, half: np.ndarray) -> Points:
    """Outline of a band of half-widths ``half`` (n,) around the curve ``pts`` (n, 2)."""
    off = normal * half[:, None]
    return _pts(np.concatenate([pts + off, (pts - off)[::-1]]))


def _lizard_spine(rng: Rng, w: int, h: int, k: float) -> tuple[np.ndarray, ...]:
    """Spine points (n, 2) from snout to tail tip, unit normals (n, 2) and body widths (n,)."""
    length, n = rng.uniform(640, 860) * k, 120
    t = np.linspace(0.0, 1.0, n)
    wave = np.sin(2 * np.pi * rng.uniform(0.4, 1.1) * t + rng.uniform(0, 2 * np.pi))
    theta = rng.uniform(0, 2 * np.pi) + rng.uniform(0.15, 0.6) * wave
    theta += rng.uniform(-2.0, 2.0) * np.clip(t - 0.45, 0, None) ** 2  # tail curl
    pts = np.cumsum(np.stack([np.cos(theta), np.sin(theta)], 1) * length / n, 0)
    # The trunk (t = 0.3) lies in the frame; near an edge a quarter of the time, cutting it off.
    margin = 0.05 if rng.random() < 0.25 else 0.22
    trunk = rng.uniform([margin * w, margin * h], [(1 - margin) * w, (1 - margin) * h])
    pts += trunk - pts[int(0.3 * n)]
    tangent = np.gradient(pts, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
    knots_t = [0.0, 0.015, 0.05, 0.09, 0.125, 0.17, 0.28, 0.38, 0.46, 0.6, 1.0]
    knots_w = [0.0, 0.45, 0.62, 0.64, 0.5, 0.82, 1.0, 0.9, 0.6, 0.38, 0.04]
    widths = np.interp(t, knots_t, knots_w) * length * rng.uniform(0.15, 0.19)
    return pts, normal, widths


def _draw_lizard(rng: Rng, w: int, h: int, k: float) -> tuple[np.ndarray, ...]:
    """Lizard mask (H, W) bool, pattern ids (H, W) uint8, spine (n, 2) and body width ()."""
    pts, normal, widths = _lizard_spine(rng, w, h, k)
    n, wb = len(pts), float(widths.max())
    mask, pattern = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    dm, dp = ImageDraw.Draw(mask), ImageDraw.Draw(pattern)
    for ti, fb, side in ((0.19, -1, -1), (0.19, -1, 1), (0.44, 1, -1), (0.44, 1, 1)):
        i = int(ti * n)
        hip = pts[i] + side * normal[i] * widths[i] * 0.3
        # +angle turns side*normal towards the head: forearms reach forward, shins back.
        a = math.atan2(side * normal[i, 1], side * normal[i, 0])
        a += fb * side * rng.uniform(-0.1, 0.5)
        knee = hip + _unit(a) * wb * rng.uniform(0.5, 0.65)
        b = a - fb * side * rng.uniform(0.7, 1.4)
        foot = knee + _unit(b) * wb * rng.uniform(0.4, 0.55)
        _capsule(dm, np.array([hip, knee]), wb * 0.3, 255)
        _capsule(dm, np.array([knee, foot]), wb * 0.22, 255)
        for toe in np.linspace(-0.9, 0.9, 5):
            tip = foot + _unit(b + toe) * wb * rng.uniform(0.18, 0.3)
            dm.line(_pts(np.array([foot, tip])), fill=255, width=max(1, round(wb * 0.05)))
    dm.polygon(_ribbon(pts, normal, widths / 2), fill=255)
    band = slice(int(0.12 * n), int(0.85 * n))
    dp.polygon(_ribbon(pts[band], normal[band], widths[band] * rng.uniform(0.2, 0.45)), fill=1)
    for _ in range(int(rng.integers(15, 60))):
        i = int(rng.uniform(0.1, 0.75) * n)
        c = pts[i] + normal[i] * widths[i] * rng.uniform(-0.42, 0.42)
        _disc(dp, c, wb * rng.uniform(0.04, 0.1), int(rng.choice([2, 2, 3])))
    i = int(0.06 * n)
    for side in (-1, 1):
        _disc(dp, pts[i] + side * normal[i] * widths[i] * 0.3, wb * 0.06, 4)
    return np.asarray(mask) > 0, np.asarray(pattern), pts, np.array(wb)


def _draw_hand(rng: Rng, w: int, h: int, k: float, spine: np.ndarray) -> tuple[np.ndarray, float]:
    """Hand part ids (H, W) uint8 of a hand gripping the lizard's trunk, and the finger width."""
    i = int(rng.uniform(0.24, 0.5) * len(spine))
    grip, tg = spine[i], spine[i + 1] - spine[i - 1]
    out = np.array([-tg[1], tg[0]]) / np.linalg.norm(tg)
    if out @ (grip - (w / 2, h / 2)) < 0:  # the arm leaves on the side away from the centre
        out = -out
    out = _unit(math.atan2(out[1], out[0]) + rng.uniform(-0.5, 0.5))
    perp, back = np.array([-out[1], out[0]]), math.atan2(-out[1], -out[0])
    plen, pw = rng.uniform(150, 185) * k, rng.uniform(125, 150) * k
    fw = pw * rng.uniform(0.21, 0.24)
    palm = grip + out * plen * rng.uniform(0.45, 0.75)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    _capsule(draw, np.array([palm + out * plen * 0.3, palm + out * (w + h)]), pw * 0.85, 1)
    ang = np.linspace(0, 2 * np.pi, 40, endpoint=False)[:, None]
    draw.polygon(_pts(palm + np.cos(ang) * out * plen / 2 + np.sin(ang) * perp * pw / 2), fill=1)
    side = 1.0 if rng.random() < 0.5 else -1.0
    base = palm + side * perp * pw * 0.42 + out * plen * 0.1
    a = back + side * rng.uniform(0.5, 0.9)
    mid = base + _unit(a) * plen * 0.35
    _capsule(draw, np.array([base, mid, mid + _unit(a - side * 0.4) * plen * 0.3]), fw * 1.15, 2)
    lengths = np.array([0.66, 0.82, 0.78, 0.62])[:: int(side)] * plen * rng.uniform(0.9, 1.25)
    spread, curl = rng.uniform(0.0, 0.1), rng.uniform(-0.3, 0.3)
    nails = rng.random() < 0.7  # the back of the hand faces the camera
    for f in range(4):
        root = palm - out * plen * 0.3 + perp * (f - 1.5) * pw * 0.235
        a = back + (f - 1.5) * spread
        mid = root + _unit(a) * lengths[f] * 0.55
        tip = mid + _unit(a + curl) * lengths[f] * 0.45
        _capsule(draw, np.array([root, mid, tip]), fw, 3 + f)
        if nails:
            _disc(draw, tip - _unit(a + curl) * fw * 0.15, fw * 0.3, _NAIL)
    return np.asarray(img), float(fw)


def _draw_chart(
    rng: Rng, w: int, h: int, k: float, fg: np.ndarray
) -> list[tuple[Points, tuple[int, int, int]]]:
    """Colour chart polygons (frame, then 24 patches) where ``fg`` (H, W) bool covers it least."""
    cw = rng.uniform(270, 330) * k
    ch = cw * rng.uniform(0.64, 0.72)
    ang = rng.uniform(-0.35, 0.35) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
    ax, ay = _unit(ang) * cw, _unit(ang + np.pi / 2) * ch
    u = np.linspace(-0.4, 0.4, 7)
    probe = (u[:, None, None] * ax + u[None, :, None] * ay).reshape(-1, 2)  # 49 sample points
    cands = rng.uniform([0.12 * w, 0.15 * h], [0.88 * w, 0.85 * h], size=(12, 2))
    cover = []
    for c in cands:  # fraction of the chart hidden by the lizard or hand, or off the frame
        p = np.round(probe + c).astype(int)
        ok = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
        cover.append(1.0 - ok.mean() + fg[p[ok, 1], p[ok, 0]].mean() * ok.mean())
    centre = cands[np.argmin(np.array(cover) + rng.uniform(0, 0.15, len(cands)))]

    def quad(x0: float, y0: float, x1: float, y1: float) -> Points:
        xy = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]) - 0.5
        return _pts(centre + xy[:, :1] * ax + xy[:, 1:] * ay)

    frame = [(28, 28, 30), (235, 235, 230), (60, 58, 55)][rng.integers(3)]
    shapes = [(quad(0, 0, 1, 1), frame)]
    pw, ph = 0.9 / 6, 0.86 / 4  # patch pitch in chart units: 6 columns, 4 rows
    order = np.arange(24) if rng.random() < 0.7 else rng.permutation(24)
    for j in range(24):
        x0, y0 = 0.05 + (j % 6) * pw, 0.07 + (j // 6) * ph
        rgb = np.clip(_CHART_RGB[order[j]] * rng.uniform(0.92, 1.06, 3), 0, 255).astype(int)
        shapes.append((quad(x0, y0, x0 + 0.88 * pw, y0 + 0.88 * ph), (rgb[0], rgb[1], rgb[2])))
    return shapes


def _draw_scraps(rng: Rng, w: int, h: int, k: float) -> list[Points]:
    """Zero to two small irregular paper scraps (label IGNORE_INDEX)."""
    scraps = []
    for _ in range(int(rng.choice([0, 0, 0, 0, 0, 1, 1, 2]))):  # in about a third of photos
        c, r = rng.uniform([0, 0], [w, h]), rng.uniform(12, 38) * k
        a = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))))[:, None]
        rim = r * rng.uniform(0.5, 1.2, a.shape) * np.hstack([np.cos(a), np.sin(a)])
        scraps.append(_pts(c + rim))
    return scraps


def _make_layout(rng: Rng, w: int, h: int, tries: int = 40) -> _Layout:
    """Draw layouts until the class fractions are plausible (all four classes present)."""
    k = math.sqrt(w * h / _REF_AREA)
    for _ in range(tries):
        lizard, pattern, spine, wb = _draw_lizard(rng, w, h, k)
        hand, fw = _draw_hand(rng, w, h, k, spine)
        chart = _draw_chart(rng, w, h, k, lizard | (hand > 0))
        label_img = Image.new("L", (w, h), BACKGROUND)
        draw = ImageDraw.Draw(label_img)
        for poly in _draw_scraps(rng, w, h, k):
            draw.polygon(poly, fill=IGNORE_INDEX)
        draw.polygon(chart[0][0], fill=BOARD)
        label = np.array(label_img)
        label[lizard], label[hand > 0] = LIZARD, HAND
        frac = np.bincount(label.ravel(), minlength=256)[:4] / label.size
        if np.all(frac >= _FRAC_LO) and np.all(frac <= _FRAC_HI):
            break
    return _Layout(label, lizard, pattern, hand, chart, float(wb), fw)


def _paper(rng: Rng, w: int, h: int, k: float) -> np.ndarray:
    """Millimetre paper (H, W, 3) float32 in 0..255: tint, fine 1 mm, 5 mm and bold 10 mm lines."""
    tint = _PAPER_TINTS[rng.integers(len(_PAPER_TINTS))] * rng.uniform(0.96, 1.03, 3)
    ink = _GRID_INKS[rng.integers(len(_GRID_INKS))]
    mm = rng.uniform(4.3, 5.6) * k  # px per millimetre
    n = 512  # the ink profile of one 10 mm period, tabulated in n steps (a power of two)
    u = np.arange(n) * (10 * mm / n)
    d1 = np.abs((u / mm + 0.5) % 1.0 - 0.5) * mm  # px to the nearest 1 mm line
    d5 = np.abs((u / (5 * mm) + 0.5) % 1.0 - 0.5) * 5 * mm
    d10 = 5 * mm - np.abs(u - 5 * mm)
    fine, mid, bold = rng.uniform([0.25, 0.45, 0.7], [0.4, 0.6, 0.9])
    lut = np.maximum.reduce(
        [fine * (1 - d1 / 0.75), mid * (1 - d5 / 0.9), bold * (1 - d10 / 1.3), 0 * u]
    )
    lut = np.round(lut * 255).astype(np.uint8)
    ang = rng.uniform(-0.1, 0.1)
    c, s = math.cos(ang) * n / (10 * mm), math.sin(ang) * n / (10 * mm)
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)[:, None]
    off = rng.uniform(n, 2 * n, 2)  # keeps indices positive for the bit mask
    lines = np.maximum(
        lut[(xs * c + (ys * s + off[0])).astype(np.int32) & (n - 1)],
        lut[(ys * c + (off[1] - xs * s)).astype(np.int32) & (n - 1)],
    )
    colours = tint + np.linspace(0, 1, 256)[:, None] * (ink - tint)
    return np.take(colours.astype(np.float32), lines, axis=0)  # (H, W, 3) by table look-up


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))  # (0, 0, 0, 0) when empty
    return slice(y, y + h), slice(x, x + w)


def _shade(mask: np.ndarray, sigma: float, floor: float) -> np.ndarray:
    """Rounded-body shading (h, w, 1) float32: ``floor`` at the mask's edge, 1 inside."""
    h, w = mask.shape
    f = 2 if sigma > 4 else 1  # blur wide kernels at half resolution: same look, quarter cost
    soft: np.ndarray = cv2.resize(mask.astype(np.float32), None, fx=1 / f, fy=1 / f)
    soft = cv2.GaussianBlur(soft, (0, 0), max(0.5, sigma / f))
    soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
    return (floor + (1 - floor) * np.clip(soft * 1.6, 0, 1))[..., None]


def _mottle(rng: Rng, shape: tuple[int, ...], cell: float, amp: float) -> np.ndarray:
    """Smooth random modulation (h, w, 1) float32 around 1 with blobs of about ``cell`` px."""
    h, w = shape[:2]
    noise = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
    return 1 + amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]


def _paint_lizard(rng: Rng, img: np.ndarray, lay: _Layout, light: np.ndarray) -> None:
    """Paint the lizard into ``img`` (H, W, 3) float32; ``light`` (H, W) is the hand's shadow."""
    sl = _bbox(lay.lizard)
    mask = lay.lizard[sl]
    base = _LIZARD_RGB[rng.integers(len(_LIZARD_RGB))] * rng.uniform(0.85, 1.15, 3)
    band = base * rng.choice([0.65, 0.8, 1.2]) * rng.uniform(0.9, 1.1, 3)
    # Pattern ids (0 skin, 1 dorsal band, 2 dark spot, 3 light spot, 4 eye) index a colour table.
    colours = np.stack([base, band, base * 0.55, np.minimum(base * 1.3 + 15, 255), (20, 18, 15)])
    tex = np.take(colours.astype(np.float32), lay.pattern[sl], axis=0)
    yy, xx = np.ogrid[0 : mask.shape[0], 0 : mask.shape[1]]
    a, period = rng.uniform(0, np.pi), rng.uniform(1.2, 1.8) * lay.body_width / 110
    ca, sa = math.cos(a) / period, math.sin(a) / period
    u = (xx * ca + yy * sa).astype(np.float32)
    scales = np.abs(np.sin(u) * np.sin((yy * ca - xx * sa).astype(np.float32) + 0.5 * u))
    tex *= ((0.85 + 0.2 * scales) * light[sl])[..., None]
    tex *= _mottle(rng, mask.shape, lay.body_width / 3, 0.12)
    tex *= _shade(mask, lay.body_width * 0.18, 0.4)
    np.copyto(img[sl], tex, where=mask[..., None])


def _paint_hand(rng: Rng, img: np.ndarray, lay: _Layout) -> None:
    """Paint the hand into ``img`` (H, W, 3) float32, in a skin tone between two of the table."""
    sl = _bbox(lay.hand > 0)
    ids = lay.hand[sl]
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    lo = int(t)
    skin = (_SKIN_TONES[lo] * (1 + lo - t) + _SKIN_TONES[lo + 1] * (t - lo)).astype(np.float32)
    skin *= rng.uniform(0.95, 1.05, 3).astype(np.float32)
    # Creases: pixels where two hand parts touch, thickened a little.
    crease = np.zeros(ids.shape, np.uint8)
    crease[:, :-1] |= (ids[:, :-1] != ids[:, 1:]) & (ids[:, :-1] > 0) & (ids[:, 1:] > 0)
    crease[:-1, :] |= (ids[:-1, :] != ids[1:, :]) & (ids[:-1, :] > 0) & (ids[1:, :] > 0)
    creased = cv2.dilate(crease, np.ones((2, 2), np.uint8)) > 0
    tex = np.empty((*ids.shape, 3), np.float32)
    tex[:] = skin
    tex[ids == _NAIL] = np.minimum(skin * 1.1 + (25, 12, 12), 255)
    tex *= _mottle(rng, ids.shape, lay.finger_width * 2, 0.03)
    tex *= _shade((ids > 0) & ~creased, lay.finger_width * 0.15, 0.5)
    tex[creased] *= 0.75
    np.copyto(img[sl], tex, where=(ids > 0)[..., None])


def _shadow(mask: np.ndarray, shift: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    """Light factor (H, W) float32, 1 - strength in the soft shadow of ``mask`` moved by ``shift``.

    Made at 1/4 scale: a soft shadow has no detail to lose.
    """
    h, w = mask.shape
    small: np.ndarray = cv2.resize(
        mask.astype(np.float32), (w // 4 + 1, h // 4 + 1), None, 0, 0, cv2.INTER_AREA
    )
    move = np.array([[1, 0, shift[0] / 4], [0, 1, shift[1] / 4]], np.float32)
    small = cv2.warpAffine(small, move, (small.shape[1], small.shape[0]))
    small = 1 - strength * cv2.GaussianBlur(small, (0, 0), max(0.5, sigma / 4))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _finish(rng: Rng, img: np.ndarray) -> np.ndarray:
    """Lighting gradient, vignetting, white balance, sensor grain and blur: (H, W, 3) uint8."""
    h, w = img.shape[:2]
    gy, gx = np.mgrid[-0.5:0.5:8j, -0.5:0.5:12j]
    g = rng.uniform(-0.35, 0.35, 2)
    light = (1 + g[0] * gx + g[1] * gy) * (1 - rng.uniform(0.1, 0.5) * (gx**2 + gy**2))
    balance = rng.uniform(0.8, 1.1) * rng.uniform([0.92, 0.95, 0.82], [1.04, 1.02, 1.05])
    light = light[..., None] * balance  # brightness and white balance
    img *= cv2.resize(light.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    # Grain in 2x2 px cells: a quarter of the random numbers, hidden by the blur below.
    grain: np.ndarray = rng.standard_normal((h // 2 + 1, w // 2 + 1), dtype=np.float32)
    grain = cv2.resize(grain * rng.uniform(1, 4), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    img += grain[:h, :w, None]
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), rng.uniform(0.4, 1.3))


def render_scene(rng: Rng, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one photo and its label, using only ``rng`` (so a seed fixes both).

    Returns the photo (H, W, 3) uint8 RGB and the label (H, W) uint8: class ids 0 lizard, 1 hand,
    2 color board, 3 background, and IGNORE_INDEX on paper scraps.
    """
    img, lay = _render(rng, width, height)
    return img, lay.label


def render_scene_objects(rng: Rng, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one photo (the same one :func:`render_scene` draws from the same ``rng`` state) and
    its class-agnostic *object and part* map, the kind of annotation SA-1B holds.

    Returns the photo (H, W, 3) uint8 RGB and ``segments`` (H, W) int32 = object id * PARTS +
    part id. Objects: 0 the paper, 1 the lizard, 2 the hand, 3 the colour chart, 4.. each paper
    scrap. Parts: the hand's arm and palm, thumb, fingers and nails; the chart's frame and each
    of its 24 patches; 0 for objects without parts. No class name is in it.
    """
    img, lay = _render(rng, width, height)
    return img, _segments(lay, width, height)


PARTS = 32  # part ids per object in :func:`render_scene_objects`' segment map


def _segments(lay: _Layout, w: int, h: int) -> np.ndarray:
    label = lay.label
    objects = np.zeros((h, w), np.int32)
    objects[label == LIZARD], objects[label == HAND], objects[label == BOARD] = 1, 2, 3
    scrap_mask = (label == IGNORE_INDEX).astype(np.uint8)
    n_scraps, scraps = cv2.connectedComponents(scrap_mask, connectivity=4)
    if n_scraps > 1:
        objects[scraps > 0] = 3 + scraps[scraps > 0]
    patches = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(patches)
    for j, (poly, _) in enumerate(lay.chart[1:]):
        draw.polygon(poly, fill=1 + j)
    parts = np.where(objects == 2, lay.hand, 0).astype(np.int32)
    parts[objects == 3] = np.asarray(patches)[objects == 3]
    return objects * PARTS + parts


def _render(rng: Rng, width: int, height: int) -> tuple[np.ndarray, _Layout]:
    w, h = width, height
    k = math.sqrt(w * h / _REF_AREA)
    lay = _make_layout(rng, w, h)
    img = _paper(rng, w, h, k)
    img[lay.label == IGNORE_INDEX] = np.array((250, 249, 246), np.float32) * rng.uniform(0.93, 1)
    chart = Image.new("RGB", (w, h), 0)
    draw = ImageDraw.Draw(chart)
    for poly, rgb in lay.chart:
        draw.polygon(poly, fill=rgb)
    board = lay.label == BOARD
    sl = _bbox(board)
    np.copyto(img[sl], np.asarray(chart)[sl], where=board[sl][..., None])
    shift = _unit(rng.uniform(0, 2 * np.pi)) * rng.uniform(4, 18) * k
    hand = lay.hand > 0
    img *= _shadow(lay.lizard | hand, shift, 18 * k, rng.uniform(0.25, 0.45))[..., None]
    _paint_lizard(rng, img, lay, _shadow(hand, shift, 12 * k, 0.35))
    _paint_hand(rng, img, lay)
    return _finish(rng, img), lay
