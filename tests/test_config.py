"""params.yaml → frozen dataclasses, validation, and the thesis preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from opensam.apps.cli import main as cli_main
from opensam.apps.presets import apply_preset, merge_params
from opensam.config import Params, load_params, parse_params
from opensam.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_are_frozen() -> None:
    """The structure of the repository's params.yaml, not the demo's values: a user who follows
    README's "Using your own data" (other classes, other data paths) keeps this test green."""
    params = load_params(ROOT / "params.yaml")
    names = params.class_names
    assert names and len(set(names)) == len(names) and all(isinstance(n, str) for n in names)
    assert len(params.prompts) == len(names) and all(params.prompts)
    assert all(c.color is None or len(c.color) == 3 for c in params.classes)
    assert params.data.source and params.data.format in ("cvat", "voc")
    assert params.student.iterations >= 1
    assert 0 <= params.ratio <= params.masks.max_ratio
    assert isinstance(params.ablation.pps, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.pps = 3  # type: ignore[misc]


def test_dataclass_defaults_are_the_demo_params() -> None:
    """One source of defaults: a field left out of params.yaml means the demo's value. Checked
    while params.yaml is the demo's (a user's own data changes it on purpose)."""
    raw = _raw()
    if raw["data"]["source"] != "data/demo":
        pytest.skip("params.yaml is not the offline demo's")
    assert dataclasses.replace(parse_params(raw), classes=()) == Params()


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"pps": 0}, "pps: must be in 1..128"),
        ({"pps": "many"}, "pps: expected an integer"),
        ({"min_region_area": -1}, "min_region_area: must be >= 0"),
        ({"warmup": {"epochs": 1.5}}, "warmup.epochs: expected an integer"),
        ({"warmup": {"bogus": 1}}, "warmup: unknown key(s) bogus"),
        ({"classes": []}, "classes: must not be empty"),
        ({"ablation": {"images": 0}}, "ablation.images: must be >= 1"),
        ({"masks": {"workers": 0}}, "masks.workers: must be >= 1"),
        ({"demo_dino": {"heldout_scenes": 1}}, "demo_dino.heldout_scenes: must be >= 2"),
    ],
)
def test_bad_params_name_the_problem(patch: dict, fragment: str, tmp_path: Path) -> None:
    raw = merge_params(_raw(), patch)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_own_data_params_load(tmp_path: Path) -> None:
    """README "Using your own data": another export, another unlabelled folder, other classes."""
    own = {
        "data": {"source": "/x/export.zip", "unlabelled": "/x/photos", "unlabelled_gt": None},
        "classes": [{"name": "cat", "prompt": "a cat"}, {"name": "sky", "prompt": "the sky"}],
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge_params(_raw(), own)))
    params = load_params(path)
    assert params.class_names == ["cat", "sky"] and params.data.unlabelled_gt is None


def test_class_weights_accept_list_or_auto() -> None:
    four = [{"name": n, "prompt": n} for n in "abcd"]  # one weight per class, whatever params say
    raw = merge_params(
        _raw(), {"classes": four, "warmup": {"class_weights": [0.4, 0.4, 0.15, 0.05]}}
    )
    assert parse_params(raw).warmup.class_weights == (0.4, 0.4, 0.15, 0.05)
    assert parse_params(_raw()).warmup.class_weights == "auto"


def test_thesis_preset_sets_method_values() -> None:
    params = parse_params(apply_preset(_raw(), "thesis"))
    assert params.clip.model == "convnext_base_w"
    assert params.clip.pretrained == "laion2b_s13b_b82k"
    assert params.sam.model == "vit_h"
    assert params.masks.generator == "sam"
    assert (params.warmup.epochs, params.student.epochs) == (30, 50)
    assert params.warmup.lr_max == pytest.approx(3e-7)
    assert params.student.class_weights == (0.1, 0.15, 0.15, 0.6)
    # untouched keys survive the merge
    assert params.data.source == _raw()["data"]["source"]


def test_preset_command_rewrites_params_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    assert cli_main(["preset", "thesis", "--params", str(path)]) == 0
    assert load_params(path).warmup.class_weights == (0.4, 0.4, 0.15, 0.05)
    assert cli_main(["preset", "nonsense", "--params", str(path)]) == 2
