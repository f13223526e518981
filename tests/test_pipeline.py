"""End to end through DVC itself, on a tiny copy of the project.

One module-scoped project runs the full `dvc repro`; the tests then check caching, which stages
`dvc exp run -S ...` reruns, and the ratio-experiment workflow of the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

TINY = {
    "image_size": 64,
    "demo": {"labelled": 10, "unlabelled": 12, "width": 160, "height": 107},
    "data": {"split": {"train": 4, "val": 3, "test": 3}},
    "masks": {"max_ratio": 3},
    "ratio": 1,
    "ablation": {"images": 3},
    "warmup": {"epochs": 1, "batch_size": 4},
    "student": {"iterations": 2, "epochs": 2, "batch_size": 2},
    "eval": {"batch_size": 8, "overlays": 2},
    "demo_clip": {
        "scenes": 4,
        "heldout_scenes": 2,
        "render_width": 96,
        "steps": 3,
        "batch_size": 8,
        "crop_size": 32,
        "warmup_steps": 1,
        "workers": 1,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(cwd: Path, *args: str, check: bool = True) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env["OPENSAM_THREADS"] = "1"
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return out


def stages_run(output: str) -> set[str]:
    """Names of the stages DVC actually ran (not the ones it skipped or restored)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = tmp_path_factory.mktemp("proj")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "predict", proj / "predict")
    shutil.copytree(ROOT / "stages", proj / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(proj, "git", "init", "-q", "-b", "main")
    run(proj, "git", "config", "user.email", "ci@example.com")
    run(proj, "git", "config", "user.name", "ci")
    run(proj, str(BIN / "dvc"), "init", "-q")
    run(proj, "git", "add", "-A")
    run(proj, "git", "commit", "-qm", "tiny project")
    out = run(proj, str(BIN / "dvc"), "repro")
    ran = stages_run(out)
    expected = {"demo_data", "demo_clip", "prepare", "masks", "zeroshot", "warmup", "student"}
    assert expected | {"control", "evaluate"} <= ran
    run(proj, "git", "add", "-A")
    run(proj, "git", "commit", "-qm", "repro")
    return proj


def test_repro_writes_every_metric(project: Path) -> None:
    for name in ("data", "zeroshot", "warmup", "pseudo", "student", "control", "eval"):
        assert (project / "metrics" / f"{name}.json").is_file(), name
    shown = json.loads(run(project, str(BIN / "dvc"), "metrics", "show", "--json"))
    text = json.dumps(shown)
    for key in ("zeroshot.json", "warmup.json", "student.json", "eval.json", "miou"):
        assert key in text
    gain = json.loads((project / "metrics" / "eval.json").read_text())["gain"]
    assert set(gain) == {"train", "val", "test"} and isinstance(gain["test"]["miou"], float)
    assert (project / "data" / "masks.h5").is_file()
    assert len(list((project / "data" / "ablation").glob("*.h5"))) == 8


def test_second_repro_changes_nothing(project: Path) -> None:
    out = run(project, str(BIN / "dvc"), "repro")
    assert stages_run(out) == set()
    assert "up to date" in out.lower()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("pps=32", {"masks", "warmup", "pseudolabel", "student", "control", "evaluate"}),
        ("ratio=3", {"pseudolabel", "student", "evaluate"}),
        ("student.alpha_f=0.5", {"student", "evaluate"}),
        ("student.mode=offline", {"student", "control", "evaluate"}),  # the default is online
        ("student.unsup_weight=0.5", {"student", "evaluate"}),
        ("seed=1", {"zeroshot", "warmup", "pseudolabel", "student", "control", "evaluate"}),
    ],
)
def test_exp_run_reruns_only_dependent_stages(
    project: Path, setting: str, expected: set[str]
) -> None:
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, str(BIN / "dvc"), "checkout", "-q", check=False)
    out = run(project, str(BIN / "dvc"), "exp", "run", "-S", setting)
    assert stages_run(out) == expected, out[-3000:]


def test_predict_pipeline_is_off_the_main_path(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    assert "predict" not in run(project, dvc, "repro", "--dry")
    out = run(project, dvc, "repro", "predict/dvc.yaml")
    assert stages_run(out) == {"predict/dvc.yaml:predict"}
    summary = json.loads((project / "metrics" / "predict.json").read_text())
    assert summary["images"] == 12
    assert len(list((project / "data" / "predictions" / "labels").glob("*.png"))) == 12


def test_ratio_experiments_compare(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    run(project, dvc, "exp", "run", "-S", "ratio=1", "-n", "r1")
    run(project, dvc, "exp", "run", "-S", "ratio=3", "-n", "r3")
    shown = run(project, dvc, "exp", "show", "--json")
    assert "r1" in shown and "r3" in shown
    diff = json.loads(run(project, dvc, "exp", "diff", "r1", "r3", "--json"))
    ratio = diff["params"]["params.yaml"]["ratio"]
    assert (ratio["old"], ratio["new"]) == (1, 3)
    assert "metrics/student.json" in diff["metrics"] or "metrics/eval.json" in diff["metrics"]
    mdiff = run(project, dvc, "metrics", "diff", "r1", "r3")
    assert "miou" in mdiff


def test_queued_ratio_sweep(project: Path) -> None:
    dvc = str(BIN / "dvc")
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, dvc, "checkout", "-q", check=False)
    run(project, dvc, "exp", "run", "--queue", "-S", "ratio=1,2", "-n", "sweep")
    run(project, dvc, "queue", "start")
    deadline = time.time() + 600
    status = ""
    while time.time() < deadline:
        status = run(project, dvc, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, run(project, dvc, "queue", "logs", "sweep-1", check=False)
    assert status.count("Success") >= 2, status
