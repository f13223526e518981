"""SAM loading and the fast automatic mask generator, checked against segment-anything's own."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

from opensam.config import SamParams
from opensam.errors import InputError
from opensam.masks.arrays import boxes_xywh
from opensam.masks.sam import (
    SAM_URL,
    AmgOptions,
    ImageSide,
    SamMaskGenerator,
    build_sam_generator,
    build_sam_tiny,
    decode_masks,
    encode_image,
    file_sha256,
    load_sam,
    resize_matrix,
    resolve_device,
)

UNFILTERED = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # random weights


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam_tiny()


def scene(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8: paper, a disc, a box and a band, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.empty((size, size, 3))
    img[:] = (0.85, 0.8, 0.7)
    img[(yy - 0.45) ** 2 + (xx - 0.35) ** 2 < 0.04] = (0.2, 0.5, 0.2)
    img[(yy > 0.2) & (yy < 0.45) & (xx > 0.6) & (xx < 0.9)] = (0.1, 0.2, 0.8)
    img[(yy > 0.7) & (xx > 0.5)] = (0.6, 0.3, 0.2)
    return np.clip(img * 255 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def best_match_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Worst best-match IoU between two (n, H, W) bool stacks, both directions."""
    fa, fb = (m.reshape(len(m), -1).astype(np.float64) for m in (a, b))
    inter = fa @ fb.T
    iou = inter / (fa.sum(1)[:, None] + fb.sum(1)[None] - inter)
    return float(min(iou.max(1).min(), iou.max(0).min()))


def test_generate_returns_a_sorted_mask_set(tiny: torch.nn.Module) -> None:
    ms = SamMaskGenerator(tiny, AmgOptions(points_per_side=5, **UNFILTERED)).generate(scene(128))
    n = len(ms)
    assert n >= 3
    assert ms.masks.shape == (n, 128, 128) and ms.masks.dtype == bool
    assert ms.area.dtype == np.int32 and np.all(np.diff(ms.area) <= 0) and ms.area[-1] > 0
    np.testing.assert_array_equal(ms.area, ms.masks.sum(axis=(1, 2)))
    np.testing.assert_array_equal(ms.bbox, boxes_xywh(ms.masks))
    for scores in (ms.predicted_iou, ms.stability_score):
        assert scores.dtype == np.float32 and scores.shape == (n,) and np.all(np.isfinite(scores))


def gap_threshold(values: np.ndarray) -> float:
    """A threshold inside the values' range, in the widest gap of the middle half, never AT a
    value: our kernels and stock's round differently (~1e-6), so a value exactly at the
    threshold (a median of an odd count, say) would fall on either side."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    lo, hi = len(v) // 4, max(len(v) // 4 + 1, (3 * len(v)) // 4)
    k = lo + int(np.argmax(np.diff(v)[lo:hi]))
    assert v[k + 1] - v[k] > 1e-4, "no clear gap to put a threshold in"
    return float(v[k] + v[k + 1]) / 2


@pytest.mark.parametrize(("min_area", "iou_quantile"), [(0, None), (20, None), (0, 0.5)])
def test_same_masks_as_stock(
    tiny: torch.nn.Module, min_area: int, iou_quantile: float | None
) -> None:
    image, pps = scene(128), 5
    opts = AmgOptions(points_per_side=pps, min_mask_region_area=min_area, **UNFILTERED)
    if iou_quantile is not None:  # a threshold inside the random model's IoU range
        ious = SamMaskGenerator(tiny, opts).generate(image).predicted_iou
        opts = AmgOptions(**{**opts.__dict__, "pred_iou_thresh": gap_threshold(ious)})
    ours = SamMaskGenerator(tiny, opts).generate(image)
    stock = SamAutomaticMaskGenerator(
        tiny, pps, 64, opts.pred_iou_thresh, 0.0, min_mask_region_area=min_area
    ).generate(image)
    stock = [r for r in stock if r["area"] > 0]  # ours drops empty masks
    assert len(ours) == len(stock) >= 2
    assert best_match_iou(ours.masks, np.stack([r["segmentation"] for r in stock])) >= 0.99
    stock_iou = np.sort([r["predicted_iou"] for r in stock])
    np.testing.assert_allclose(np.sort(ours.predicted_iou), stock_iou, atol=1e-5)


def test_nothing_passes_gives_an_empty_set(tiny: torch.nn.Module) -> None:
    opts = AmgOptions(points_per_side=4, pred_iou_thresh=0.999, stability_score_thresh=0.0)
    ms = SamMaskGenerator(tiny, opts).generate(scene(64))
    assert len(ms) == 0 and ms.masks.shape == (0, 64, 64) and ms.bbox.shape == (0, 4)


def test_decoder_matches_stock_decoder(tiny: torch.nn.Module) -> None:
    torch.manual_seed(1)
    features = torch.randn(1, 32, 64, 64)
    coords = torch.rand(10, 1, 2, dtype=torch.float64) * 1024
    with torch.inference_mode():
        sparse, dense = tiny.prompt_encoder(
            (coords, torch.ones(10, 1, dtype=torch.int)), None, None
        )
        pe = tiny.prompt_encoder.get_dense_pe()
        low, iou = tiny.mask_decoder(features, pe, sparse, dense, True)
        side = ImageSide(tiny, features)
        ours_iou, rows, ours_low = decode_masks(tiny, side, sparse)
        # a threshold in a wide gap between two rows' best IoU predictions, never at a row's
        # value: our decoder and stock round differently (1e-6), so a value AT the threshold
        # (the median, say) falls on either side
        thresh = gap_threshold(iou.max(dim=1).values.numpy())
        _, some, some_low = decode_masks(tiny, side, sparse, thresh)
    torch.testing.assert_close(ours_iou, iou, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_low, low, atol=1e-5, rtol=1e-4)
    assert rows.tolist() == list(range(10))
    expected = torch.nonzero((iou > thresh).any(dim=1))[:, 0]
    assert 0 < len(some) < 10 and some.tolist() == expected.tolist()
    torch.testing.assert_close(some_low, low[expected], atol=1e-5, rtol=1e-4)


def test_encoder_matches_stock_encoder(tiny: torch.nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():  # rel-pos tables are zero at init: make them matter
        for blk in tiny.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        ours, stock = encode_image(tiny.image_encoder, x), tiny.image_encoder(x)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("n_valid", "n_out"), [(64, 64), (43, 30), (43, 50)])
def test_resize_matrix_is_the_postprocess_chain(n_valid: int, n_out: int) -> None:
    low = torch.randn(2, 3, 16, 16)
    up = F.interpolate(low, (64, 64), mode="bilinear", align_corners=False)[..., :n_valid, :]
    expected = F.interpolate(up, (n_out, 64), mode="bilinear", align_corners=False)
    mh, mw = resize_matrix(16, 64, n_valid, n_out), resize_matrix(16, 64, 64, 64)
    torch.testing.assert_close(mh @ low @ mw.T, expected, atol=1e-5, rtol=1e-5)


def test_original_photo_input(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(scene(160)[:96]).save(photo)  # 96 x 160: not square, not the prepared size
    sam = SamParams(model="tiny", checkpoint=None, input="original", device="cpu", **UNFILTERED)
    gen = build_sam_generator(sam, points_per_side=4, min_region_area=0, image_size=64)
    for original in (photo, None):
        ms = gen.generate(scene(64), original=original)
        assert ms.masks.shape[1:] == (64, 64) and len(ms) >= 1 and np.all(np.diff(ms.area) <= 0)


def test_crop_layers_run_the_stock_generator(tiny: torch.nn.Module) -> None:
    opts = AmgOptions(points_per_side=2, crop_n_layers=1, min_mask_region_area=10, **UNFILTERED)
    ms = SamMaskGenerator(tiny, opts).generate(scene(64))
    assert ms.masks.shape[1:] == (64, 64) and len(ms) >= 1 and np.all(np.diff(ms.area) <= 0)


def test_missing_checkpoint_names_the_download(tmp_path: Path) -> None:
    path = tmp_path / "models" / "sam_vit_b_01ec64.pth"
    with pytest.raises(InputError) as err:
        load_sam("vit_b", path, "cpu")
    assert str(err.value).startswith(f"{path}: SAM checkpoint not found")
    assert f"{SAM_URL}sam_vit_b_01ec64.pth" in str(err.value)
    with pytest.raises(InputError, match="tiny has no official checkpoint"):
        load_sam("tiny", path, "cpu")


def test_checkpoint_of_another_model_says_which(tmp_path: Path, tiny: torch.nn.Module) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(
        InputError, match=f"^{path}: not a sam.model=vit_b checkpoint; .*looks like tiny"
    ):
        load_sam("vit_b", path, "cpu")


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    garbage, listed, foreign = tmp_path / "g.pth", tmp_path / "l.pth", tmp_path / "f.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    torch.save([1, 2], listed)
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match=f"^{garbage}: cannot read SAM checkpoint"):
        load_sam("tiny", garbage, "cpu")
    with pytest.raises(InputError, match=f"^{listed}: not a SAM checkpoint"):
        load_sam("tiny", listed, "cpu")
    with pytest.raises(InputError, match=f"^{foreign}: .*it is not a SAM state dict"):
        load_sam("tiny", foreign, "cpu")


def test_checkpoint_round_trip_and_random_init_warning(
    tmp_path: Path, tiny: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny.state_dict()}, path)  # a wrapped state dict is accepted
    loaded = load_sam("tiny", path, "cpu")
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with caplog.at_level(logging.WARNING, logger="opensam.masks.sam"):
        load_sam("tiny", None, "auto")
    assert "random weights" in caplog.text


def test_bad_model_device_and_input_names() -> None:
    with pytest.raises(InputError, match="^sam.model: unknown SAM model 'vit_x'"):
        load_sam("vit_x", None)
    with pytest.raises(InputError, match="^sam.device: expected auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="^sam.input: expected prepared or original"):
        build_sam_generator(SamParams(model="tiny", checkpoint=None, input="photo"), 4, 0, 64)


def test_file_sha256(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 << 20)  # spans several 1 MiB chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_vit_b_checkpoint_through_the_real_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b.pth"
    state = sam_model_registry["vit_b"]().state_dict()
    torch.save(state, path)
    sam = SamParams(model="vit_b", checkpoint=str(path), device="cpu", **UNFILTERED)
    gen = build_sam_generator(sam, points_per_side=2, min_region_area=0, image_size=64)
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(gen.model.state_dict()[key], state[key])
    ms = gen.generate(scene(64))
    assert ms.masks.shape[1:] == (64, 64) and 1 <= len(ms) <= 12
    assert np.all(np.diff(ms.area) <= 0) and ms.area[-1] > 0
