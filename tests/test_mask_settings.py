"""opensam.masks.settings: checkpoints record the mask settings they were trained with, and a stage
given a mask store of other settings refuses it with a one-line error naming the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import (
    QUADRANT_STORE_ATTRS,
    load_stage,
    make_quadrant_project,
    write_params,
    write_tiny_checkpoint,
)

from opensam.errors import InputError
from opensam.masks.settings import (
    SETTING_KEYS,
    check_store_settings,
    open_mask_store,
    store_settings,
)
from opensam.model.segmenter import read_checkpoint_meta

SETTINGS = {k: QUADRANT_STORE_ATTRS[k] for k in SETTING_KEYS}  # superpixels, pps 2, area 0, 64


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_quadrant_project(tmp_path_factory.mktemp("proj"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints trained on the project's store (``same``), on pps 4 (``other``), and
    one of the older format without a record (``old``)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "same": write_tiny_checkpoint(root / "same.pt", masks=SETTINGS),
        "other": write_tiny_checkpoint(root / "other.pt", masks={**SETTINGS, "pps": 4}),
        "old": write_tiny_checkpoint(root / "old.pt"),
    }


def test_store_settings_and_checkpoint_record(
    project: tuple[Path, Path], checkpoints: dict[str, Path]
) -> None:
    store = open_mask_store(project[1])
    assert store_settings(store) == SETTINGS
    assert read_checkpoint_meta(checkpoints["same"])["masks"] == SETTINGS
    assert "masks" not in read_checkpoint_meta(checkpoints["old"])


def test_open_mask_store_missing_names_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"^{tmp_path / 'nope.h5'}: mask store not found"):
        open_mask_store(tmp_path / "nope.h5")


def test_check_store_settings(project: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    store = open_mask_store(project[1])
    check_store_settings(SETTINGS, store, Path("t.pt"))  # the same: fine
    with pytest.raises(InputError) as err:
        check_store_settings({**SETTINGS, "pps": 4, "generator": "sam"}, store, Path("t.pt"))
    message = str(err.value)
    assert message.startswith(f"t.pt: trained with other masks than {project[1]}")
    assert "pps 4 vs 2" in message and "generator 'sam' vs 'superpixels'" in message
    assert "min_region_area" not in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="opensam.masks.settings"):
        check_store_settings(None, store, Path("old.pt"))  # older checkpoint: accepted
    assert "old.pt: no mask settings recorded" in caplog.text


def evaluate_argv(project: tuple[Path, Path], teacher: Path, student: Path, root: Path) -> list:
    params = write_params(root / "params.yaml", eval={"batch_size": 4, "overlays": 1})
    return [
        "--prepared",
        str(project[0]),
        "--masks",
        str(project[1]),
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(root / "eval.json"),
        "--plots",
        str(root / "eval"),
        "--params",
        str(params),
    ]


def test_evaluate_refuses_a_store_of_other_pps(
    project: tuple[Path, Path], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    argv = evaluate_argv(project, checkpoints["same"], checkpoints["other"], tmp_path)
    with pytest.raises(InputError, match=f"^{checkpoints['other']}: trained with other masks"):
        load_stage("evaluate").main(argv)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "eval").exists()


def test_pseudolabel_refuses_a_store_of_other_pps(
    project: tuple[Path, Path], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out, metrics = tmp_path / "pseudo", tmp_path / "pseudo.json"
    argv = [
        "--prepared",
        str(project[0]),
        "--masks",
        str(project[1]),
        "--teacher",
        str(checkpoints["other"]),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--params",
        str(write_params(tmp_path / "params.yaml", ratio=1)),
    ]
    with pytest.raises(InputError) as err:
        load_stage("pseudolabel").main(argv)
    assert str(err.value).startswith(f"{checkpoints['other']}: trained with other masks")
    assert "pps 4 vs 2" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not metrics.exists()
    argv[argv.index("--teacher") + 1] = str(checkpoints["same"])  # the matching one works
    assert load_stage("pseudolabel").main(argv) == 0 and metrics.is_file()
