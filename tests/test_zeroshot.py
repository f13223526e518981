"""opensam.eval.zeroshot (the zero-shot model, the ablation scoring, its table and CSV) and the
zeroshot stage, on a tiny prepared project with ablation stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_stage
from PIL import Image

from opensam.config import ClipParams
from opensam.errors import InputError
from opensam.eval.metrics import confusion_matrix, miou_from_confusion
from opensam.eval.zeroshot import (
    THESIS,
    build_zeroshot_model,
    format_csv,
    format_quality_table,
    format_table,
    run_ablation,
    select_ids,
)
from opensam.masks.arrays import MaskSet
from opensam.masks.store import MaskStore, MaskStoreWriter
from opensam.model.aggregation import prepare_mask_inputs
from opensam.model.segmenter import OpenSamModel
from opensam.prepared import read_prepared

SIZE = 64
CLASSES = [
    {"name": "lizard", "prompt": "a lizard"},
    {"name": "hand", "prompt": "a human hand"},
    {"name": "color board", "prompt": "a color board"},
    {"name": "background", "prompt": "a background"},
]
TRAIN = ["t0", "t1", "t2", "t3"]
PPS, AREAS = [8, 16], [0, 100]


def label_of(k: int) -> np.ndarray:
    """(64, 64) uint8: four class blocks at an image-dependent split, a few ignore pixels."""
    label = np.full((SIZE, SIZE), 3, np.uint8)
    cut = 20 + 4 * k
    label[:cut, :cut] = 0
    label[:cut, cut:] = 1
    label[cut:, :16] = 2
    label[-3:, -3:] = 255
    return label


def region_masks(label: np.ndarray, split: bool, drop_small: bool) -> MaskSet:
    """Masks = the label's class regions (each halved when ``split``), sorted largest first."""
    masks = []
    for c in range(4):
        region = label == c
        parts = [region]
        if split:
            half = np.zeros_like(region)
            half[:, : SIZE // 2] = True
            parts = [region & half, region & ~half]
        masks += [p for p in parts if p.any() and not (drop_small and p.sum() < 100)]
    stack = np.stack(masks)
    area = stack.reshape(len(masks), -1).sum(1).astype(np.int32)
    order = np.argsort(-area, kind="stable")
    n = len(masks)
    return MaskSet(
        masks=stack[order],
        area=area[order],
        predicted_iou=np.ones(n, np.float32),
        stability_score=np.ones(n, np.float32),
        bbox=np.zeros((n, 4), np.int32),
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("zeroshot")
    prepared = tmp_path / "data/prepared"
    (prepared / "images").mkdir(parents=True)
    (prepared / "labels").mkdir()
    gen = np.random.default_rng(0)
    colours = np.array([[200, 180, 40], [230, 180, 150], [40, 90, 230], [240, 240, 230]])
    for k, image_id in enumerate(TRAIN):
        label = label_of(k)
        rgb = colours[np.minimum(label, 3)] + gen.integers(-20, 20, (SIZE, SIZE, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(prepared / f"images/{image_id}.png")
        Image.fromarray(label, mode="L").save(prepared / f"labels/{image_id}.png")
    splits = {
        "image_size": SIZE,
        "classes": [c["name"] for c in CLASSES],
        "train": TRAIN,
        "val": [],
        "test": [],
        "unlabelled": [],
    }
    (prepared / "splits.json").write_text(json.dumps(splits))
    for pps in PPS:
        for area in AREAS:
            attrs = {
                "generator": "test",
                "model": "none",
                "checkpoint_sha256": "",
                "pps": pps,
                "min_region_area": area,
                "image_size": SIZE,
            }
            ids = [i for i in TRAIN if not (i == "t1" and pps == 16)]  # t1 lacks one store
            with MaskStoreWriter(tmp_path / f"data/ablation/pps{pps}_mra{area}.h5", attrs) as w:
                for image_id in ids:
                    label = label_of(TRAIN.index(image_id))
                    w.write(image_id, region_masks(label, pps == 16, area > 0))
    params = {
        "seed": 3,
        "image_size": SIZE,
        "classes": CLASSES,
        "ablation": {"pps": PPS, "min_region_area": AREAS, "images": 2},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def read_rgb(root: Path, image_id: str) -> torch.Tensor:
    img = np.array(Image.open(root / f"data/prepared/images/{image_id}.png"))
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


def prototype_model(root: Path) -> OpenSamModel:
    """The stage's random tiny model with class prototypes (mean embedding of each class's
    pixels) as text embeddings, so that predictions differ between classes and variants."""
    model = build_zeroshot_model(
        ClipParams(pretrained=None), [c["prompt"] for c in CLASSES], seed=3
    )
    with torch.no_grad():
        emb = model.embed(torch.stack([read_rgb(root, i) for i in TRAIN]))
        up = torch.nn.functional.interpolate(emb, size=(SIZE, SIZE), mode="bilinear")
        labels = torch.from_numpy(np.stack([label_of(k) for k in range(len(TRAIN))]))
        protos = torch.stack([up.permute(1, 0, 2, 3)[:, labels == c].mean(1) for c in range(4)])
    model.text_embeddings = torch.nn.functional.normalize(protos, dim=1)
    return model


def run_stage(root: Path, monkeypatch: pytest.MonkeyPatch, seen: list | None = None) -> int:
    """The stage's main() in ``root``, its zero-shot model swapped for :func:`prototype_model`
    (the arguments it was built with are appended to ``seen``)."""
    stage = load_stage("zeroshot")

    def build(*args: object) -> OpenSamModel:
        (seen if seen is not None else []).append(args)
        return prototype_model(root)

    monkeypatch.setattr(stage, "build_zeroshot_model", build)
    argv = [
        "--prepared",
        "data/prepared",
        "--ablation",
        "data/ablation",
        "--out",
        "metrics/zeroshot.json",
        "--table",
        "metrics/zeroshot.md",
        "--plot",
        "metrics/zeroshot_plot.csv",
        "--params",
        "params.yaml",
    ]
    monkeypatch.chdir(root)
    return int(stage.main(argv))


def expected_miou(
    root: Path,
    model: OpenSamModel,
    ids: list[str],
    masks: dict[str, MaskSet] | None,
    variant: str,
) -> float:
    """Recompute one variant independently through the model's own forward pass."""
    conf = np.zeros((4, 4), np.int64)
    for image_id in ids:
        label = np.asarray(Image.open(root / f"data/prepared/labels/{image_id}.png"))
        pool = winner = None
        if masks is not None:
            inputs = prepare_mask_inputs(masks[image_id].masks, model.grid_hw(SIZE), variant)
            pool, winner = inputs.pool_weights[None], inputs.winner[None]
        with torch.no_grad():
            logp = model(read_rgb(root, image_id)[None], pool, winner)
        conf += confusion_matrix(logp[0].argmax(0), label, 4)
    return round(100 * miou_from_confusion(conf), 2)


def ablation(root: Path) -> tuple[dict[str, dict[str, float]], int]:
    prepared = read_prepared(root / "data/prepared")
    return run_ablation(prototype_model(root), prepared, root / "data/ablation", PPS, AREAS, 2)


@pytest.fixture(scope="module")
def scored(project: Path) -> tuple[dict[str, dict[str, float]], int]:
    return ablation(project)


def test_run_ablation_scores_every_variant(
    project: Path, scored: tuple[dict[str, dict[str, float]], int]
) -> None:
    results, count = scored
    assert count == 2
    assert list(results) == ["baseline", "nu", "nu_mra100", "pm_mra100"]
    assert list(results["nu"]) == ["pps8", "pps16"]
    values = [results["baseline"]["miou"]] + [
        v for k in results if k != "baseline" for v in results[k].values()
    ]
    model = prototype_model(project)
    ids = ["t0", "t2"]  # the first 2 train ids in every store (t1 lacks the pps16 stores)
    assert results["baseline"]["miou"] == expected_miou(project, model, ids, None, "nu")
    iou = results["baseline"]["iou"]  # per-class IoU of the per-pixel baseline, class order
    assert list(iou) == [c["name"] for c in CLASSES]
    present = [v for v in iou.values() if v is not None]
    assert present and abs(sum(present) / len(present) - results["baseline"]["miou"]) < 0.02
    nu8 = {i: region_masks(label_of(TRAIN.index(i)), False, False) for i in ids}
    assert results["nu"]["pps8"] == expected_miou(project, model, ids, nu8, "nu")
    pm16 = {i: region_masks(label_of(TRAIN.index(i)), True, True) for i in ids}
    assert results["pm_mra100"]["pps16"] == expected_miou(project, model, ids, pm16, "pm")
    assert len(set(values)) > 1  # the variants really differ on this data


def test_select_ids_and_its_errors(project: Path) -> None:
    stores = [MaskStore(project / f"data/ablation/pps{p}_mra0.h5") for p in PPS]
    assert select_ids(TRAIN, stores, 3, SIZE) == ["t0", "t2", "t3"]
    assert select_ids(TRAIN, stores[:1], 2, SIZE) == ["t0", "t1"]
    with pytest.raises(InputError, match="pps8_mra0.h5: masks are not 32x32"):
        select_ids(TRAIN, stores, 2, 32)
    with pytest.raises(InputError, match="no train image is in every ablation store"):
        select_ids(["t1"], stores, 2, SIZE)


def test_format_table_and_csv() -> None:
    results = {"baseline": {"miou": 40.0}, "nu": {"pps8": 70.0, "pps16": 80.5}}
    results |= {"nu_mra100": {"pps8": 69.0, "pps16": 80.0}, "pm_mra100": {"pps8": 60.0}}
    csv = format_csv(results, [8, 16]).splitlines()
    assert csv == ["pps,nu,nu_mra100,pm_mra100", "8,70.0,69.0,60.0", "16,80.5,80.0,"]
    table = format_table(results, [8, 16])
    assert "| OpenCLIP alone | 40.00 |" in table and "| + SAM, PM, MMRA=100 |" in table
    assert f"| *thesis* | {THESIS['baseline']['miou']:.2f} |" in table


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    return build_zeroshot_model(
        ClipParams(pretrained=None), [c["prompt"] for c in CLASSES], seed
    ).state_dict()


def test_build_zeroshot_model_is_one_model_whatever_ran_before() -> None:
    torch.manual_seed(123)
    first = tiny_weights(3)
    before = torch.get_rng_state()
    torch.rand(1000)  # other code consumed random numbers (e.g. loading checkpoints)
    after_use = torch.get_rng_state()
    second = tiny_weights(3)
    assert torch.equal(torch.get_rng_state(), after_use)  # the caller's RNG is untouched
    assert not torch.equal(before, after_use)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = tiny_weights(4)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed matters


def test_zeroshot_main_writes_the_table_json_and_plot(
    project: Path, scored: tuple[dict[str, dict[str, float]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list = []
    assert run_stage(project, monkeypatch, seen) == 0
    ((clip, prompts, seed),) = seen  # the library's one zero-shot model, from params
    assert (clip.model, prompts, seed) == ("opensam-tiny", [c["prompt"] for c in CLASSES], 3)
    results = json.loads((project / "metrics/zeroshot.json").read_text())
    quality = results.pop("mask_quality")
    assert results == scored[0]
    # one mask-quality record per ablation store, on the same images as the mIoU
    assert set(quality) == {f"pps{p}_mra{a}" for p in PPS for a in AREAS}
    assert all(q["images"] == 2 and 0 <= q["uncovered"] <= 1 for q in quality.values())
    csv = (project / "metrics/zeroshot_plot.csv").read_text()
    assert csv == format_csv(results, PPS)
    assert csv.splitlines()[1] == "8," + ",".join(
        str(results[k]["pps8"]) for k in ("nu", "nu_mra100", "pm_mra100")
    )
    table = (project / "metrics/zeroshot.md").read_text()
    assert format_table(results, PPS) in table
    assert table.endswith(format_quality_table(quality))
    assert "| OpenCLIP alone | " + f"{results['baseline']['miou']:.2f} |" in table
    assert "| *thesis* | 48.92 |" in table
    assert f"| + SAM, NU |  | {results['nu']['pps8']:.2f} | " in table
    assert "75.45" in table and "MMRA=100" in table and "on 2 train images" in table


def test_zeroshot_missing_store_is_an_input_error(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(project, tmp_path / "copy", ignore=shutil.ignore_patterns("metrics"))
    project = tmp_path / "copy"
    missing = project / "data/ablation/pps8_mra100.h5"
    missing.unlink()
    with pytest.raises(InputError, match="^data/ablation/pps8_mra100.h5: mask store not found"):
        run_stage(project, monkeypatch)
    assert not (project / "metrics").exists()
