"""Smoke test of stages/zeroshot.py main() on a tiny prepared project with ablation stores."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from opensam.aggregation import prepare_mask_inputs
from opensam.config import ClipParams
from opensam.errors import InputError
from opensam.mask_store import MaskSet, MaskStoreWriter
from opensam.metrics import confusion_matrix, miou_from_confusion
from opensam.model import OpenSamModel, build_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CLASSES = [
    {"name": "lizard", "prompt": "a lizard"},
    {"name": "hand", "prompt": "a human hand"},
    {"name": "color board", "prompt": "a color board"},
    {"name": "background", "prompt": "a background"},
]
TRAIN = ["t0", "t1", "t2", "t3"]
PPS, AREAS = [8, 16], [0, 100]


def load_stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stage_zeroshot", ROOT / "stages/zeroshot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture
def project(tmp_path: Path) -> Path:
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
    torch.manual_seed(3)  # params seed: the stage seeds before building
    model = build_model(ClipParams(), [c["prompt"] for c in CLASSES])
    with torch.no_grad():
        emb = model.embed(torch.stack([read_rgb(root, i) for i in TRAIN]))
        up = torch.nn.functional.interpolate(emb, size=(SIZE, SIZE), mode="bilinear")
        labels = torch.from_numpy(np.stack([label_of(k) for k in range(len(TRAIN))]))
        protos = torch.stack([up.permute(1, 0, 2, 3)[:, labels == c].mean(1) for c in range(4)])
    model.text_embeddings = torch.nn.functional.normalize(protos, dim=1)
    return model


def run_stage(root: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    stage = load_stage()
    monkeypatch.setattr(stage, "build_model", lambda clip, prompts: prototype_model(root))
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


def test_zeroshot_main_writes_the_table_json_and_plot(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_stage(project, monkeypatch) == 0
    results = json.loads((project / "metrics/zeroshot.json").read_text())
    assert list(results) == ["baseline", "nu", "nu_mra100", "pm_mra100"]
    assert list(results["nu"]) == ["pps8", "pps16"]
    values = [results["baseline"]["miou"]] + [
        v for k in results if k != "baseline" for v in results[k].values()
    ]
    assert all(0.0 <= v <= 100.0 for v in values)
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

    csv = (project / "metrics/zeroshot_plot.csv").read_text().splitlines()
    assert csv[0] == "pps,nu,nu_mra100,pm_mra100"
    assert csv[1] == "8," + ",".join(
        str(results[k]["pps8"]) for k in ("nu", "nu_mra100", "pm_mra100")
    )
    assert len(csv) == 3 and csv[2].startswith("16,")

    table = (project / "metrics/zeroshot.md").read_text()
    assert "| OpenCLIP alone | " + f"{results['baseline']['miou']:.2f} |" in table
    assert "| *thesis* | 48.92 |" in table
    assert f"| + SAM, NU |  | {results['nu']['pps8']:.2f} | " in table
    assert "75.45" in table and "MMRA=100" in table and "on 2 train images" in table


def test_zeroshot_missing_store_is_an_input_error(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = project / "data/ablation/pps8_mra100.h5"
    missing.unlink()
    with pytest.raises(InputError, match="^data/ablation/pps8_mra100.h5: mask store not found"):
        run_stage(project, monkeypatch)
    assert not (project / "metrics").exists()
