"""Object masks from a learned boundary map: the demo's stand-in for SAM (``demo_sam``).

A small class-agnostic U-Net (:class:`BoundaryNet`) predicts, for every pixel, how strongly it
lies on the border between two objects (target 1) or two parts of one object (target
``PART_TARGET``); :mod:`opensam.demo.boundaries` pretrains it on generated scenes. Turning the
map into nested regions is the classic hierarchical-watershed recipe (the COB / UCM family):

1. *basins*: the connected components of the pixels below ``seed_threshold`` grown over the rest
   of the image by a watershed on the boundary map, so every pixel belongs to one basin;
2. *merge tree*: neighbouring basins are merged in order of the mean boundary strength along
   their shared border (Kruskal on the region adjacency graph), so weak borders go first;
3. *levels*: the partition left when every border weaker than ``t`` is merged, for each ``t``
   of ``levels`` (parts at low ``t``, whole objects at high ``t``); the levels are nested.

The proposals are the regions of every level, each kept once, that hold at least one point of a
``pps`` × ``pps`` grid, the way SAM's automatic generator keeps the masks its grid of point
prompts selects: a coarse grid misses small parts (their pixels fall to the object that holds
them), a fine grid finds them, so ``pps`` keeps its meaning. A region's ``stability_score`` is
the share of levels it survives unchanged, like SAM's; ``predicted_iou`` is one minus the mean
boundary strength inside it.

Only step 3's grid depends on ``pps`` and the minimum region area: :class:`DemoSamGenerator` keeps
the last images' hierarchies (:class:`Hierarchy`), so the zero-shot ablation, which asks for the
same images at every (pps, area) cell, runs the net and the merging once per image.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed
from torch import nn

from opensam.errors import InputError
from opensam.masks.arrays import MaskSet

log = logging.getLogger(__name__)

PART_TARGET = 0.5  # training target on the border between two parts of one object
# Merge thresholds (parts ... whole objects) and the basins' seed strength, chosen on the demo's
# val split with an 800-step net, ABO at pps 16: levels 0.3/0.5/0.7/0.85 0.850, these nine 0.856;
# seed 0.05 0.855 (nine levels). Single-linkage merging instead of re-averaged borders: 0.846.
DEFAULT_LEVELS = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
SEED_THRESHOLD = 0.1  # basins grow from the connected components below this strength
CHECKPOINT_KIND = "opensam-demo-sam"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BoundaryNet(nn.Module):
    """A U-Net: (B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) boundary logits; H, W divisible by 16.

    ``width`` is the channel count of the first level (doubled per level, 4 levels); the full
    resolution keeps one light block so that 2-px borders stay sharp.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        c = [width, width * 2, width * 4, width * 6]
        self.stem = _block(3, c[0])
        self.down = nn.ModuleList([_block(c[i], c[i + 1]) for i in range(3)])
        self.up = nn.ModuleList([_block(c[i + 1] + c[i], c[i]) for i in reversed(range(3))])
        self.head = nn.Conv2d(c[0], 1, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - cast(torch.Tensor, self.mean)) / 0.25
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(nn.functional.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = nn.functional.interpolate(y, size=skip.shape[-2:], mode="bilinear")
            y = block(torch.cat([y, skip], 1))
        out: torch.Tensor = self.head(y)
        return out


def save_boundary_net(net: BoundaryNet, meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of ``net`` (plain tensors and numbers: loads with weights_only)."""
    return {"kind": CHECKPOINT_KIND, "width": net.width, "state_dict": net.state_dict(), **meta}


def load_boundary_net(path: str | Path) -> BoundaryNet:
    """The :class:`BoundaryNet` saved at ``path`` by the ``demo_sam`` stage, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: demo SAM checkpoint not found (run `dvc repro demo_sam`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path}: not a demo SAM checkpoint (kind {CHECKPOINT_KIND!r} missing)")
    width = ckpt.get("width")
    if not isinstance(width, int) or not 1 <= width <= 256:
        raise InputError(f"{path}: bad width in the demo SAM checkpoint")
    net = BoundaryNet(width)
    try:
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise InputError(
            f"{path}: weights do not fit a BoundaryNet ({type(exc).__name__})"
        ) from None
    if not all(torch.isfinite(p).all() for p in net.state_dict().values() if p.is_floating_point()):
        raise InputError(f"{path}: the demo SAM weights hold NaN or infinite values")
    return net.eval()


@torch.no_grad()
def predict_boundaries(net: BoundaryNet, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) or (H, W, 3) uint8 → boundary probabilities (B, H, W) or (H, W) float32."""
    single = images.ndim == 3
    batch = images[None] if single else images
    x = torch.from_numpy(np.array(batch, copy=True)).permute(0, 3, 1, 2).float() / 255.0  # writable
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    prob = torch.sigmoid(net(x))[:, 0, :h, :w].numpy().astype(np.float32)
    return prob[0] if single else prob


def basins(boundary: np.ndarray, seed_threshold: float = SEED_THRESHOLD) -> np.ndarray:
    """(H, W) boundary map → (H, W) int32 basin ids 0..n-1 covering every pixel."""
    seeds = (boundary < seed_threshold).astype(np.uint8)
    n, markers = cv2.connectedComponents(seeds, connectivity=4)
    if n <= 1:  # no seed at all: one region
        return np.zeros(boundary.shape, np.int32)
    labels = watershed(boundary, markers=markers)  # every pixel joins the basin it drains to
    return np.asarray(labels, np.int32) - 1


def border_sums(labels: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, ...]:
    """Adjacent basin pairs (m, 2) (a < b), and the sum and count of the boundary strength along
    each shared border (per neighbouring pixel pair, the larger of the two strengths)."""
    n = int(labels.max()) + 1
    pairs, values = [], []
    for a, b, va, vb in (
        (labels[:, :-1], labels[:, 1:], boundary[:, :-1], boundary[:, 1:]),
        (labels[:-1, :], labels[1:, :], boundary[:-1, :], boundary[1:, :]),
    ):
        diff = a != b
        lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
        pairs.append(lo.astype(np.int64) * n + hi)
        values.append(np.maximum(va[diff], vb[diff]))
    keys = np.concatenate(pairs)
    if not keys.size:
        return np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(0)
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(values))
    return np.stack([uniq // n, uniq % n], 1), sums, np.bincount(inverse).astype(np.float64)


def merge_levels(
    labels: np.ndarray, boundary: np.ndarray, levels: Sequence[float] = DEFAULT_LEVELS
) -> list[np.ndarray]:
    """The nested partitions (one (n_basins,) array of region ids per level, finest first).

    Greedy merging, weakest border first, where the border of two merged regions is the union of
    their borders and its strength the mean over it (as the ultrametric contour map does), so a
    short gap in a strong wall does not join two objects. The partition of level ``t`` is the
    one left when the weakest remaining border is at least ``t``.
    """
    n = int(labels.max()) + 1
    pairs, sums, counts = border_sums(labels, boundary)
    border: dict[tuple[int, int], list[float]] = {}
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    heap: list[tuple[float, int, int]] = []
    for (a, b), total, count in zip(pairs.tolist(), sums.tolist(), counts.tolist(), strict=True):
        border[a, b] = [total, count]
        neighbours[a].add(b)
        neighbours[b].add(a)
        heap.append((total / count, a, b))
    heapq.heapify(heap)
    root = list(range(n))
    out: list[np.ndarray] = []
    for t in sorted(levels):
        while heap and heap[0][0] < t:
            mean, a, b = heapq.heappop(heap)
            edge = border.get((a, b))
            if edge is None or edge[0] / edge[1] != mean:
                continue  # stale: one side was merged since, or its border grew
            del border[a, b]
            neighbours[a].discard(b)
            neighbours[b].discard(a)
            for c in neighbours.pop(b):  # b joins a: b's borders become a's
                old = border.pop((min(b, c), max(b, c)))
                neighbours[c].discard(b)
                key = (min(a, c), max(a, c))
                merged = border.setdefault(key, [0.0, 0.0])
                merged[0] += old[0]
                merged[1] += old[1]
                neighbours[a].add(c)
                neighbours[c].add(a)
                heapq.heappush(heap, (merged[0] / merged[1], *key))
            root[b] = a
        out.append(_resolve(root))
    return out


def _resolve(root: list[int]) -> np.ndarray:
    """Each basin's current region id, following the merge links to their end."""
    ids = np.asarray(root, np.int64)
    while True:
        nxt = ids[ids]
        if np.array_equal(nxt, ids):
            return ids
        ids = nxt


def grid_points(pps: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """SAM's point grid: ``pps`` × ``pps`` points at the cell centres, as (rows, cols) indices."""
    centres = (np.arange(pps) + 0.5) / pps
    rows = np.minimum((centres * height).astype(np.int64), height - 1)
    cols = np.minimum((centres * width).astype(np.int64), width - 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


@dataclass(frozen=True)
class Hierarchy:
    """One image's nested regions: the boundary map, its basins and the merge levels."""

    boundary: np.ndarray  # (H, W) float32 boundary probabilities
    labels: np.ndarray  # (H, W) int32 basin ids
    levels: list[np.ndarray]  # per level, finest first: (n_basins,) region id of each basin


def hierarchy(
    boundary: np.ndarray,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed_threshold: float = SEED_THRESHOLD,
) -> Hierarchy:
    """Steps 1 and 2 of the module docstring: basins and the merge levels of ``boundary``."""
    labels = basins(boundary, seed_threshold)
    return Hierarchy(boundary, labels, merge_levels(labels, boundary, levels))


def regions_from_boundaries(
    boundary: np.ndarray,
    pps: int,
    min_region_area: int = 0,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed_threshold: float = SEED_THRESHOLD,
) -> MaskSet:
    """(H, W) boundary probabilities → MaskSet of the hierarchy's regions (largest first)."""
    return regions_at(hierarchy(boundary, levels, seed_threshold), pps, min_region_area)


def regions_at(tree: Hierarchy, pps: int, min_region_area: int = 0) -> MaskSet:
    """Step 3: the regions of every level that hold a point of the ``pps`` × ``pps`` grid, each
    once, of at least ``min_region_area`` pixels, as a MaskSet (largest first)."""
    boundary, labels, maps = tree.boundary, tree.labels, tree.levels
    h, w = boundary.shape
    rows, cols = grid_points(pps, h, w)
    hit_basins = labels[rows, cols]
    seen: dict[bytes, int] = {}
    chosen: list[np.ndarray] = []
    survived: list[int] = []
    for ids in maps:
        for root in np.unique(ids[hit_basins]):
            members = np.flatnonzero(ids == root)
            key = members.tobytes()
            if key in seen:
                survived[seen[key]] += 1
                continue
            seen[key] = len(chosen)
            chosen.append(members)
            survived.append(1)
    lut = np.zeros(int(labels.max()) + 1, bool)
    masks, keep_iou = [], []
    for members in chosen:
        lut[:] = False
        lut[members] = True
        masks.append(lut[labels])
    if not masks:
        return MaskSet.empty(h, w)
    stack = np.stack(masks)
    area = stack.reshape(len(stack), -1).sum(1).astype(np.int32)
    for m in stack:
        keep_iou.append(1.0 - float(boundary[m].mean()))
    order = np.argsort(-area, kind="stable")
    order = order[area[order] >= max(1, min_region_area)]
    stack, area = stack[order], area[order]
    bbox = np.zeros((len(stack), 4), np.int32)
    for i, m in enumerate(stack):
        sl = ndimage.find_objects(m.view(np.uint8))[0]
        bbox[i] = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
    return MaskSet(
        masks=stack,
        area=area,
        predicted_iou=np.asarray(keep_iou, np.float32)[order],
        stability_score=(np.asarray(survived, np.float32) / len(maps))[order],
        bbox=bbox,
    )


class DemoSamGenerator:
    """MaskGenerator over a pretrained :class:`BoundaryNet` (``masks.generator: demo_sam``).

    The hierarchies of the last :attr:`CACHED_IMAGES` images are shared by every generator of
    the same weights in this process (keyed by the checkpoint's and the image's bytes), so
    generators of other (pps, area) cells cut them without running the net again."""

    thread_safe = True  # the net runs under a lock; the regions are computed outside it
    CACHED_IMAGES: ClassVar[int] = 64  # about 0.5 MB each at 256²; the ablation's 47 fit
    _cache: ClassVar[OrderedDict[tuple[str, bytes], Hierarchy]] = OrderedDict()
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, checkpoint: str | Path, points_per_side: int, min_region_area: int) -> None:
        self.net = load_boundary_net(checkpoint)
        self._net_key = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()  # ~2 MB
        self.points_per_side = points_per_side
        self.min_region_area = min_region_area
        self._lock = threading.Lock()

    def generate(self, image: np.ndarray, original: Path | None = None) -> MaskSet:
        """(H, W, 3) uint8 → MaskSet with (n, H, W) bool masks; ``original`` is not used."""
        return regions_at(self.hierarchy(image), self.points_per_side, self.min_region_area)

    def hierarchy(self, image: np.ndarray) -> Hierarchy:
        """The image's :class:`Hierarchy`, from the shared cache when it holds it."""
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
        key = (self._net_key, str(image.shape).encode() + digest.digest())
        with self._cache_lock:
            tree = self._cache.get(key)
            if tree is not None:
                self._cache.move_to_end(key)
                return tree
        with self._lock:
            boundary = predict_boundaries(self.net, image)
        tree = hierarchy(boundary)
        with self._cache_lock:
            self._cache[key] = tree
            while len(self._cache) > self.CACHED_IMAGES:
                self._cache.popitem(last=False)
        return tree
