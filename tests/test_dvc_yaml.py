"""dvc.yaml declares exactly the sources each stage reads: its script, the core modules and the
subpackage folders it reaches through imports (tools/dvc_deps.py writes them)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dvc_deps", ROOT / "tools" / "dvc_deps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["dvc_deps"] = module
    spec.loader.exec_module(module)
    return module


dvc_deps = _tool()


def _stages() -> dict[str, dict]:
    stages: dict[str, dict] = {}
    for name in dvc_deps.PIPELINES:
        stages.update(yaml.safe_load((ROOT / name).read_text())["stages"])
    return stages


def test_dvc_yaml_src_deps_are_current() -> None:
    assert dvc_deps.main(["--check"]) == 0, "run: python tools/dvc_deps.py"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_declares_its_script_and_existing_sources(name: str) -> None:
    deps = [d for d in _stages()[name].get("deps", []) if isinstance(d, str)]
    script = dvc_deps.stage_scripts()[name]
    assert script in deps, f"{name}: its own script is not a dep"
    for dep in deps:
        if dep.startswith("src/"):
            assert (ROOT / dep).exists(), f"{name}: {dep} does not exist"


def test_layers_only_rerun_the_stages_that_use_them() -> None:
    deps = {n: set(s.get("deps", [])) for n, s in _stages().items()}
    assert "src/opensam/train" not in deps["masks"] | deps["prepare"] | deps["zeroshot"]
    assert "src/opensam/masks" in deps["masks"] and "src/opensam/train" in deps["student"]
    assert not any(d.startswith("src/opensam/masks/") for d in deps["masks"]), "folders, not files"


def test_launched_torch_stages_depend_on_the_launcher_file_only() -> None:
    stages = _stages()
    for name in ("masks", "warmup", "pseudolabel", "student", "control", "evaluate", "predict"):
        stage = stages[name]
        assert stage["cmd"].startswith("python -m opensam.apps.launch --nproc ${runtime.nproc} ")
        assert "runtime" in stage.get("params", []), f"{name}: runtime params not declared"
        deps = set(stage["deps"])
        assert dvc_deps.LAUNCHER in deps or "src/opensam/apps" in deps, name
    assert "src/opensam/apps" not in stages["warmup"]["deps"]  # the launcher file, not apps/


def test_closure_follows_lazy_and_transitive_imports(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from opensam.eval.zeroshot import build_zeroshot_model\n")
    deps = dvc_deps.source_deps(script)
    assert "src/opensam/eval" in deps
    assert "src/opensam/model" in deps  # eval.zeroshot imports model.segmenter
    assert "src/opensam/errors.py" in deps  # a core module, as a file
    assert "src/opensam/apps" not in deps


def test_check_reports_and_sync_repairs_a_stale_file(tmp_path: Path) -> None:
    for rel in ("dvc.yaml", "predict/dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    text = (tmp_path / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/opensam/masks\n", "", 1))
    root = ["--root", str(tmp_path)]
    assert dvc_deps.main(["--check", *root]) == 1
    assert dvc_deps.main(root) == 0
    assert dvc_deps.main(["--check", *root]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == text


def test_trained_models_are_dvc_model_artifacts() -> None:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        found = repo.artifacts.read()["dvc.yaml"]
    outs = {o for s in _stages().values() for o in s.get("outs", []) if isinstance(o, str)}
    for name in ("teacher", "student"):
        assert found[name].type == "model"
        assert found[name].path in outs, f"{name}: the artifact is no stage's output"
