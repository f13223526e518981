"""dvc.yaml declares exactly the sources each stage reads: its script and every library file it
reaches through imports, file by file (tools/dvc_deps.py writes them)."""

from __future__ import annotations

import functools
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


def test_deps_are_files_and_follow_the_layers() -> None:
    deps = {n: set(s.get("deps", [])) for n, s in _stages().items()}
    for name, found in deps.items():
        folders = [d for d in found if d.startswith("src/") and not d.endswith(".py")]
        assert not folders, f"{name}: whole folders {folders}, not files"
    train = {d for d in deps["student"] if d.startswith("src/opensam/train/")}
    assert "src/opensam/train/online.py" in train
    assert not train & (deps["masks"] | deps["prepare"] | deps["zeroshot"])
    assert "src/opensam/masks/store.py" in deps["masks"]
    assert "src/opensam/masks/sam.py" in deps["masks"]  # imported inside a function, when chosen
    assert "src/opensam/masks/generators.py" not in deps["warmup"]  # training reads the store only


LIBRARY = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "src" / "opensam").rglob("*.py")
    if p.name != "__init__.py"
)


@functools.cache
def _stage_closures() -> dict[str, list[str]]:
    launched = dvc_deps.launched_scripts()
    return {
        stage: dvc_deps.stage_deps(ROOT / script, script in launched)
        for stage, script in dvc_deps.stage_scripts().items()
    }


@pytest.mark.parametrize("module", LIBRARY)
def test_a_module_edit_reruns_exactly_the_stages_that_import_it(module: str) -> None:
    """The stages whose deps name ``module`` (what an edit of it, a docstring say, reruns) are
    the stages whose script reaches it through imports; launched stages also reach the
    launcher."""
    importers = sorted(stage for stage, deps in _stage_closures().items() if module in deps)
    assert dvc_deps.stages_using(module) == importers


@pytest.mark.parametrize(
    "module", ["src/opensam/apps/predict_setup.py", "src/opensam/apps/predict_shards.py"]
)
def test_a_docstring_edit_in_a_predict_only_module_reruns_no_stage(
    module: str, tmp_path: Path
) -> None:
    """Edit the module's docstring in a copy of the project: the deps the tool computes do not
    change, and no stage of the main pipeline depends on the file (only ``predict`` itself)."""
    for rel in ("dvc.yaml", "predict/dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / module
    text = path.read_text()
    assert text.startswith('"""')
    path.write_text('"""An edited first line.\n\n' + text[3:])
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 0
    assert dvc_deps.stages_using(module, tmp_path) == ["predict"]
    main = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert not [name for name, spec in main.items() if module in spec.get("deps", [])]


def test_launched_torch_stages_depend_on_the_launcher_file_only() -> None:
    stages = _stages()
    for name in ("masks", "warmup", "pseudolabel", "student", "control", "evaluate", "predict"):
        stage = stages[name]
        assert stage["cmd"].startswith("python -m opensam.apps.launch --nproc ${runtime.nproc} ")
        assert "runtime" in stage.get("params", []), f"{name}: runtime params not declared"
        assert dvc_deps.LAUNCHER in set(stage["deps"]), name
    apps = [d for d in stages["warmup"]["deps"] if d.startswith("src/opensam/apps/")]
    assert apps == [dvc_deps.LAUNCHER]


def test_closure_follows_lazy_and_transitive_imports(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from opensam.eval.zeroshot import build_zeroshot_model\n")
    deps = dvc_deps.source_deps(script)
    assert "src/opensam/eval/zeroshot.py" in deps
    assert "src/opensam/model/segmenter.py" in deps  # eval.zeroshot imports model.segmenter
    assert "src/opensam/errors.py" in deps  # a core module
    assert "src/opensam/eval/evaluation.py" not in deps  # a module of eval it does not reach
    assert not any(d.startswith("src/opensam/apps/") for d in deps)
    assert not any(d.endswith("__init__.py") for d in deps)


def test_check_reports_and_sync_repairs_a_stale_file(tmp_path: Path) -> None:
    for rel in ("dvc.yaml", "predict/dvc.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    text = (tmp_path / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/opensam/masks/store.py\n", "", 1))
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
