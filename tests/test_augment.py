"""Joint augmentation: masks, labels and image content must move together."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from opensam.constants import IGNORE_INDEX
from opensam.data.augment import (
    AugmentConfig,
    Augmenter,
    gaussian_blur,
    jitter_colour,
    sample_affine,
)

GEOMETRIC_ONLY = AugmentConfig(
    hflip_prob=0.5,
    scale=(0.3, 1.0),
    rotate_deg=15.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    blur_prob=0.0,
)
PHOTOMETRIC_ONLY = AugmentConfig(hflip_prob=0.0, scale=(1.0, 1.0), rotate_deg=0.0, blur_prob=1.0)
PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])


def blocky_label(seed: int, size: int = 48, classes: int = 4) -> torch.Tensor:
    """(H, W) int64: a few random rectangles of each class on background class 3, some 255."""
    rng = np.random.default_rng(seed)
    label = np.full((size, size), classes - 1, dtype=np.int64)
    for c in [*range(classes - 1), IGNORE_INDEX]:
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(6, size // 2, 2)
        label[y : y + h, x : x + w] = c
    return torch.from_numpy(label)


def masks_from_label(label: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool: one mask per class present, plus each class's left half (overlaps)."""
    masks = []
    for c in torch.unique(label).tolist():
        if c == IGNORE_INDEX:
            continue
        region = label == c
        masks.append(region)
        half = region.clone()
        half[:, label.shape[1] // 2 :] = False
        masks.append(half)
    stack = torch.stack(masks)
    order = torch.argsort(stack.flatten(1).sum(1), descending=True, stable=True)
    return stack[order]


def paint(label: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float image with each class's palette colour (255 → black)."""
    img = torch.zeros(3, *label.shape)
    for c in range(len(PALETTE)):
        img[:, label == c] = PALETTE[c][:, None]
    return img


@pytest.mark.parametrize("seed", range(6))
def test_masks_stay_aligned_with_label(seed: int) -> None:
    label = blocky_label(seed)
    masks = masks_from_label(label)
    out = Augmenter(GEOMETRIC_ONLY)(paint(label), label, masks, np.random.default_rng(seed))
    assert out.label is not None and out.masks is not None
    assert out.masks.shape == masks.shape and out.masks.dtype == torch.bool
    for m in range(out.masks.shape[0]):
        values = torch.unique(out.label[out.masks[m]])
        assert len(values) <= 1, f"mask {m} covers labels {values.tolist()}"
    # every labelled pixel is still covered by the mask of its own class region
    assert bool(out.masks.any(0)[out.label != IGNORE_INDEX].all())


@pytest.mark.parametrize("seed", range(6))
def test_image_content_moves_with_label(seed: int) -> None:
    label = blocky_label(seed + 100)
    out = Augmenter(GEOMETRIC_ONLY)(paint(label), label, None, np.random.default_rng(seed))
    assert out.label is not None
    # nearest palette colour of each augmented pixel vs the augmented label
    dist = ((out.image[None] - PALETTE[:, :, None, None]) ** 2).sum(1)
    from_image = dist.argmin(0)
    valid = out.label < len(PALETTE)
    agree = (from_image[valid] == out.label[valid]).float().mean().item()
    assert agree > 0.95, agree
    assert valid.any()


def test_geometry_actually_changes_things() -> None:
    label = blocky_label(3)
    moved = 0
    for seed in range(5):
        out = Augmenter(GEOMETRIC_ONLY)(paint(label), label, None, np.random.default_rng(seed))
        assert out.label is not None
        moved += int(not torch.equal(out.label, label))
    assert moved >= 4


def test_flip_only_mirrors_exactly() -> None:
    cfg = replace(GEOMETRIC_ONLY, hflip_prob=1.0, scale=(1.0, 1.0), aspect=(1.0, 1.0), rotate_deg=0)
    label = blocky_label(1)
    image = torch.rand(3, *label.shape, generator=torch.Generator().manual_seed(0))
    masks = masks_from_label(label)
    out = Augmenter(cfg)(image, label, masks, np.random.default_rng(0))
    assert out.label is not None and out.masks is not None
    assert torch.equal(out.label, label.flip(-1))
    assert torch.equal(out.masks, masks.flip(-1))
    assert torch.allclose(out.image, image.flip(-1), atol=1e-5)


def test_identity_affine_without_randomness() -> None:
    cfg = AugmentConfig(hflip_prob=0.0, scale=(1.0, 1.0), aspect=(1.0, 1.0), rotate_deg=0.0)
    matrix = sample_affine(20, 30, cfg, np.random.default_rng(0))
    assert np.allclose(matrix, np.eye(3))


def test_photometric_touches_image_only() -> None:
    label = blocky_label(2)
    masks = masks_from_label(label)
    image = paint(label) * 0.8 + 0.1
    out = Augmenter(PHOTOMETRIC_ONLY)(image, label, masks, np.random.default_rng(5))
    assert out.label is not None and out.masks is not None
    assert torch.equal(out.label, label) and torch.equal(out.masks, masks)
    assert not torch.allclose(out.image, image)
    assert out.image.dtype == torch.float32 and out.image.shape == image.shape
    assert float(out.image.min()) >= 0.0 and float(out.image.max()) <= 1.0


def test_same_rng_seed_same_result_other_seed_differs() -> None:
    label = blocky_label(4)
    image, masks = paint(label), masks_from_label(label)
    aug = Augmenter()
    a = aug(image, label, masks, np.random.default_rng(7))
    b = aug(image, label, masks, np.random.default_rng(7))
    c = aug(image, label, masks, np.random.default_rng(8))
    assert torch.equal(a.image, b.image) and a.label is not None and b.label is not None
    assert torch.equal(a.label, b.label)
    assert not torch.equal(a.image, c.image)


def test_jitter_identity_and_hue_keeps_gray() -> None:
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(jitter_colour(image, 1.0, 1.0, 1.0, 0.0), image, atol=1e-6)
    gray = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(jitter_colour(gray, 1.0, 1.0, 1.0, 0.2), gray, atol=1e-5)


def test_blur_preserves_mean_of_constant_and_smooths() -> None:
    const = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.0), const, atol=1e-6)
    spike = torch.zeros(1, 15, 15)
    spike[0, 7, 7] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert blurred[0, 7, 7] < 0.5 and abs(float(blurred.sum()) - 1.0) < 1e-4
