"""The tiny DVC project of the end-to-end tests (tests/test_pipeline*.py): a copy of the
repository's dvc.yaml, stages and sources with tiny params, after one full `dvc repro`.

It is built once per pytest session (:func:`shared_project`), by whichever of the two modules
asks first, on whichever xdist worker; each module then works on its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "image_size": 64,
    "demo": {"labelled": 10, "unlabelled": 12, "width": 160, "height": 107},
    "data": {"split": {"train": 4, "val": 3, "test": 3}},
    "masks": {"max_ratio": 3},
    "ratio": 1,
    # a 1 x 2 grid (NU, and NU and PM with MMRA), not the demo's 4 x 2: each store is one more
    # stage run in the project's build, which the end-to-end tests wait for
    "ablation": {"images": 3, "pps": [8], "min_region_area": [0, 100]},
    "warmup": {"epochs": 1, "batch_size": 4, "lr_max": 0.002},
    # every unlabelled pixel counts (threshold 0): a teacher after one epoch at 64² may be
    # confident (0.9) nowhere, and then the student ignores the pool, its bytes do not depend on
    # the ratio, and a ratio experiment changes no student metric (CI, 2026-12: the ratio-3
    # student was the ratio-1 student). The threshold itself: tests/test_online.py and
    # tests/test_pseudo_labels.py
    "student": {"iterations": 2, "epochs": 2, "batch_size": 2, "conf_threshold": 0.0},
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
    "demo_sam": {
        "scenes": 4,
        "heldout_scenes": 2,
        "render_width": 96,
        "steps": 3,
        "batch_size": 2,
        "crop_size": 32,
        "width": 4,
        "workers": 1,
    },
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


def build_project(proj: Path) -> Path:
    """Fill the empty folder ``proj`` with the tiny project, run `dvc repro` and commit."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "predict", proj / "predict")
    shutil.copytree(ROOT / "stages", proj / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
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
    expected = {"demo_data", "demo_clip", "demo_sam", "prepare", "masks", "zeroshot", "warmup"}
    assert expected | {"student", "control", "oracle", "evaluate"} <= ran
    run(proj, "git", "add", "-A")
    run(proj, "git", "commit", "-qm", "repro")
    return proj


def shared_project(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy (in a new folder ``name``) of the session's one built tiny project.

    The first caller builds it under a file lock in the session's temporary root (shared by the
    xdist workers), in a temporary folder renamed when done; later callers wait for the lock and
    copy it. A DVC project is relocatable: its cache is ``.dvc/cache`` and its paths relative.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker else root
    built = root / "tiny-project"
    with open(root / "tiny-project.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not built.is_dir():
            tmp = root / f"tiny-project.{os.getpid()}.tmp"
            tmp.mkdir()
            build_project(tmp)
            tmp.rename(built)
    dest = tmp_path_factory.mktemp(name)
    shutil.copytree(built, dest, symlinks=True, dirs_exist_ok=True)
    return dest


def reset(proj: Path) -> None:
    """Back to the committed repro: params, metrics and outputs as `build_project` left them."""
    run(proj, "git", "checkout", "-q", "--", ".")
    run(proj, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(proj, str(BIN / "dvc"), "checkout", "-q", check=False)


def declared_reruns(proj: Path, setting: str) -> set[str]:
    """The stages of dvc.yaml that ``dvc exp run -S setting`` must rerun, as DVC's own graph
    declares them: those whose params deps DVC's status reports changed (`dvc status dvc.yaml`),
    and every stage that depends on them, however indirectly (`dvc dag`). Through DVC's Python
    API in this process: the same calls as those commands, without a DVC start-up each (the
    suite checks nine settings). params.yaml is put back afterwards."""
    import networkx as nx
    from dvc.repo import Repo

    key, value = setting.split("=", 1)
    path = proj / "params.yaml"
    text = path.read_text()
    over = yaml.safe_load(value)
    for name in reversed(key.split(".")):
        over = {name: over}
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(text), over), sort_keys=False))
    try:
        with contextlib.chdir(proj), Repo(str(proj)) as repo:  # DVC resolves paths from cwd
            status = repo.status(targets=["dvc.yaml"])
            graph = repo.index.graph  # edges: a stage -> the stages that produce its deps
            names = {stage: stage.addressing for stage in graph}
            changed = {
                stage
                for stage in graph
                for entry in status.get(names[stage], [])
                if isinstance(entry, dict) and "params.yaml" in entry.get("changed deps", {})
            }
            out = set(changed).union(*(nx.ancestors(graph, stage) for stage in changed))
            return {names[stage] for stage in out if ":" not in names[stage]}
    finally:
        path.write_text(text)
