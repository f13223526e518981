"""SAM 2.1 (``masks.generator: sam2``): the sam2 package's real tiny architecture with random
weights, saved as a checkpoint file and loaded through our builder; the store it writes."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="the sam2 package (requirements.txt) is not installed")

import yaml  # noqa: E402
from conftest import load_stage, write_tiny_project  # noqa: E402

from opensam.apps.cli import build_parser  # noqa: E402
from opensam.config import SAM2_MODEL_NAMES, MasksParams, Sam2Params, SamParams  # noqa: E402
from opensam.errors import InputError  # noqa: E402
from opensam.eval.mask_quality import store_quality  # noqa: E402
from opensam.masks import generators as mg  # noqa: E402
from opensam.masks.arrays import boxes_xywh  # noqa: E402
from opensam.masks.sam import build_sam_tiny  # noqa: E402
from opensam.masks.sam2_masks import (  # noqa: E402
    SAM2_MODELS,
    SAM2_URL,
    PackageInfoFilter,
    Sam2MaskGenerator,
    Sam2Options,
    build_sam2_model,
    load_sam2,
    resolve_sam2_device,
)
from opensam.masks.store import MaskStore, validate_store  # noqa: E402
from opensam.prepared import read_prepared  # noqa: E402

TINY = "sam2.1_hiera_tiny"
UNFILTERED = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # random weights


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """SAM 2.1 tiny with random weights (seed 0) saved as the official file layout."""
    torch.manual_seed(0)
    net = build_sam2_model(TINY, "cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": net.state_dict()}, path)
    return path, net


def image(size: int = 64) -> np.ndarray:
    """A paper background with a dark disc and a blue box, plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.full((size, size, 3), (0.85, 0.8, 0.7))
    img[(yy - 0.45) ** 2 + (xx - 0.35) ** 2 < 0.04] = (0.2, 0.3, 0.2)
    img[(yy > 0.6) & (xx > 0.55)] = (0.1, 0.2, 0.8)
    return np.clip(img * 255 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def test_the_params_names_are_the_models_built() -> None:
    assert tuple(SAM2_MODELS) == SAM2_MODEL_NAMES


def test_checkpoint_round_trip(tiny_checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, net = tiny_checkpoint
    loaded = load_sam2(TINY, path, "cpu")
    assert type(loaded).__name__ == "SAM2Base" and not loaded.training
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_missing_checkpoint_is_one_line_naming_the_download(tmp_path: Path) -> None:
    for model, (_, name) in SAM2_MODELS.items():
        path = tmp_path / "models" / name
        with pytest.raises(InputError) as err:
            load_sam2(model, path, "cpu")
        msg = str(err.value)
        assert msg.startswith(f"{path}: SAM 2.1 checkpoint not found") and "\n" not in msg
        assert f"{SAM2_URL}{name}" in msg
    # the store attrs check the file before anything is built
    sam2 = Sam2Params(checkpoint=str(tmp_path / "nowhere.pt"))
    with pytest.raises(InputError, match="nowhere.pt: SAM 2.1 checkpoint not found"):
        mg.store_attrs("sam2", 4, 0, 64, MasksParams(generator="sam2"), SamParams(), sam2)


def test_checkpoint_of_another_model_says_which(
    tmp_path: Path, tiny_checkpoint: tuple[Path, torch.nn.Module]
) -> None:
    path = tiny_checkpoint[0]
    with pytest.raises(InputError) as err:
        load_sam2("sam2.1_hiera_small", path, "cpu")
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a sam2.model=sam2.1_hiera_small checkpoint; ")
    assert "it looks like sam2.1_hiera_tiny (96 wide, 12 blocks trunk)" in msg
    assert f"{SAM2_URL}sam2.1_hiera_small.pt" in msg and "\n" not in msg
    sam1 = tmp_path / "sam1.pth"
    torch.save(build_sam_tiny().state_dict(), sam1)
    with pytest.raises(InputError, match=f"^{sam1}: .*looks like a SAM 1 checkpoint"):
        load_sam2(TINY, sam1, "cpu")


def test_bad_checkpoint_files_model_and_device(tmp_path: Path) -> None:
    garbage, listed = tmp_path / "g.pt", tmp_path / "l.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    torch.save([1, 2], listed)
    with pytest.raises(InputError, match=f"^{garbage}: cannot read SAM 2.1 checkpoint"):
        load_sam2(TINY, garbage, "cpu")
    with pytest.raises(InputError, match=f"^{listed}: not a SAM 2.1 checkpoint"):
        load_sam2(TINY, listed, "cpu")
    with pytest.raises(InputError, match="^sam2.model: unknown SAM 2.1 model 'sam2.1_hiera_xl'"):
        load_sam2("sam2.1_hiera_xl", None)
    with pytest.raises(InputError, match="^sam2.device: expected auto, cpu or cuda"):
        resolve_sam2_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_sam2_device("cuda")


def test_generate_is_the_package_generator_as_a_sorted_mask_set(
    tiny_checkpoint: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = Sam2MaskGenerator(tiny_checkpoint[1], Sam2Options(points_per_side=3, **UNFILTERED))
    img = image(64)
    records = gen.records(img)  # the package's SAM2AutomaticMaskGenerator, run once
    assert records, "random weights gave no mask at all"
    monkeypatch.setattr(gen, "records", lambda _: records)
    ms = gen.generate(img)
    kept = [r for r in records if r["area"] > 0]
    n = len(ms)
    assert n == len(kept) and ms.masks.shape == (n, 64, 64) and ms.masks.dtype == bool
    assert np.all(np.diff(ms.area) <= 0) and ms.area[-1] > 0
    np.testing.assert_array_equal(ms.area, ms.masks.sum(axis=(1, 2)))
    np.testing.assert_array_equal(ms.bbox, boxes_xywh(ms.masks))
    assert sorted(ms.area.tolist()) == sorted(int(r["area"]) for r in kept)
    np.testing.assert_allclose(
        np.sort(ms.predicted_iou), np.sort([r["predicted_iou"] for r in kept]), rtol=1e-6
    )
    assert ms.predicted_iou.dtype == np.float32 and ms.stability_score.dtype == np.float32


def test_the_packages_per_image_info_lines_are_dropped_and_its_warnings_kept(
    tiny_checkpoint: tuple[Path, torch.nn.Module], caplog: pytest.LogCaptureFixture
) -> None:
    gen = Sam2MaskGenerator(tiny_checkpoint[1], Sam2Options(points_per_side=2, **UNFILTERED))
    with caplog.at_level(logging.INFO):
        gen.records(image(64))
        logging.info("a root INFO line from elsewhere")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("image embeddings" in m for m in messages), messages
    assert "a root INFO line from elsewhere" in messages  # the filter is gone after the call
    record = logging.LogRecord("root", logging.WARNING, "/x/sam2/y.py", 1, "w", None, None)
    assert PackageInfoFilter().filter(record)  # the package's warnings pass


def test_store_through_precompute_masks(
    tmp_path: Path, tiny_checkpoint: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The masks stage's path: attrs, a valid store that MaskStore reads and the mask-quality
    report works on, then reuse."""
    path = tiny_checkpoint[0]
    p = write_tiny_project(tmp_path, n_train=1, n_val=1, n_test=0, n_unlab=0)
    prepared = read_prepared(p["prepared"])
    ids = list(prepared.val)  # one image: SAM 2.1 tiny takes ~10 s per image on this CPU
    masks = MasksParams(generator="sam2", workers=1)
    sam2 = Sam2Params(checkpoint=str(path), device="cpu", **UNFILTERED)
    out = tmp_path / "sam2.h5"
    args: dict[str, Any] = {"pps": 3, "min_region_area": 10, "masks": masks, "sam": SamParams()}
    summary = mg.precompute_masks(prepared, out, ids, sam2=sam2, **args)
    assert summary["images"] == 1 and summary["masks_min"] >= 1

    attrs = mg.store_attrs("sam2", 3, 10, 64, masks, SamParams(), sam2)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {k: attrs[k] for k in ("generator", "model", "checkpoint_sha256", "pps")} == {
        "generator": "sam2",
        "model": TINY,
        "checkpoint_sha256": sha,
        "pps": 3,
    }
    assert attrs["min_region_area"] == 10 and attrs["image_size"] == 64
    assert json.loads(str(attrs["generator_config"])) == {
        "box_nms_thresh": 0.7,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
    }
    assert validate_store(out, attrs, ids)
    store = MaskStore(out)
    try:
        assert sorted(store.ids()) == sorted(ids)
        for i in ids:
            assert store.num_masks(i) >= 1
        assert store.attrs["generator"] == "sam2" and store.attrs["checkpoint_sha256"] == sha
        quality = store_quality(store, prepared.val, prepared)  # the masks stage's --quality
        assert quality["images"] == 1 and quality["masks_per_image"] >= 1
        assert 0 <= quality["abo"] <= 1 and 0 <= quality["uncovered"] <= 1
    finally:
        store.close()

    def fail(*a: object) -> None:
        raise AssertionError("an up-to-date store must not build SAM 2")

    monkeypatch.setitem(mg.MASK_GENERATORS, "sam2", fail)
    assert mg.precompute_masks(prepared, out, ids, sam2=sam2, **args)["images"] == 1
    other = Sam2Params(checkpoint=str(path), device="cpu", pred_iou_thresh=0.5)
    changed = mg.store_attrs("sam2", 3, 10, 64, masks, SamParams(), other)
    assert not validate_store(out, changed, ids)


def test_masks_stage_reads_the_sam2_params(tmp_path: Path) -> None:
    """params.yaml -> stage -> store attrs: a missing sam2.checkpoint stops before any model."""
    p = write_tiny_project(tmp_path, n_train=1, n_val=1, n_test=0, n_unlab=0)
    raw = yaml.safe_load(p["params"].read_text())
    missing = tmp_path / "models" / "sam2.1_hiera_small.pt"
    raw["masks"]["generator"] = "sam2"
    raw["sam2"] = {**raw["sam2"], "model": "sam2.1_hiera_small", "checkpoint": str(missing)}
    p["params"].write_text(yaml.safe_dump(raw))
    argv = ["--prepared", str(p["prepared"]), "--out", str(tmp_path / "m.h5")]
    with pytest.raises(InputError) as err:
        load_stage("masks").main([*argv, "--params", str(p["params"])])
    assert str(err.value).startswith(f"{missing}: SAM 2.1 checkpoint not found")
    assert f"{SAM2_URL}sam2.1_hiera_small.pt" in str(err.value)


def test_predict_accepts_masks_sam2() -> None:
    args = build_parser().parse_args(["predict", "photos", "--out", "o", "--masks", "sam2"])
    assert args.masks == "sam2"
