"""dvc.yaml declares exactly the source files each stage reads.

A stage's script imports library modules (directly or through other modules, including lazy
imports inside functions); every one of them must be a DVC dependency, or editing it would not
rerun the stage. Extra source deps would rerun stages needlessly, so they are flagged too.
Run this file directly to print the expected lists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "opensam"


def _imports(path: Path) -> set[str]:
    """opensam module names imported anywhere in ``path`` (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "opensam":
                found.update(f"opensam.{a.name}" for a in node.names)
            elif node.module.startswith("opensam."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("opensam."))
    return found


def module_closure(script: Path) -> set[str]:
    """Repo-relative paths of every opensam module reachable from ``script``."""
    seen: set[str] = set()
    todo = list(_imports(script))
    while todo:
        mod = todo.pop()
        rel = Path("src", *mod.split(".")).with_suffix(".py")
        if str(rel) in seen or not (ROOT / rel).is_file():
            continue
        seen.add(str(rel))
        todo.extend(_imports(ROOT / rel))
    return seen


PIPELINES = ("dvc.yaml", "predict/dvc.yaml")  # predict/ is off the main path, wdir = root


def _stages() -> dict[str, dict]:
    stages: dict[str, dict] = {}
    for name in PIPELINES:
        stages.update(yaml.safe_load((ROOT / name).read_text())["stages"])
    return stages


def _script(stage: dict) -> Path:
    match = re.search(
        r"python (?:-m opensam\.apps\.launch --nproc \S+ )?(stages/\w+\.py)", stage["cmd"]
    )
    assert match, stage["cmd"]
    return ROOT / match.group(1)


LAUNCHER = "src/opensam/apps/launch.py"  # `python -m opensam.apps.launch ... stages/x.py`


def stage_sources(stage: dict) -> set[str]:
    """The import closure of the stage's script, plus the launcher when the cmd uses it."""
    launcher = {LAUNCHER} if "opensam.apps.launch" in stage["cmd"] else set()
    return module_closure(_script(stage)) | launcher


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_declares_exactly_its_sources(name: str) -> None:
    stage = _stages()[name]
    script = _script(stage)
    deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
    assert str(script.relative_to(ROOT)) in deps, f"{name}: its own script is not a dep"
    declared = {d for d in deps if d.startswith("src/")}
    expected = stage_sources(stage)
    assert declared == expected, (
        f"{name}: missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
    )


def test_closure_follows_lazy_imports(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from opensam.model.segmenter import build_model\n")
    assert "src/opensam/model/segmenter.py" in module_closure(script)
    assert "src/opensam/model/clip.py" in module_closure(script)  # model imports clip_model


def sync_dvc_yaml() -> None:
    """Rewrite dvc.yaml's src/ deps of every stage to the import closure (keeps all else)."""
    closures = {
        str(_script(stage).relative_to(ROOT)): sorted(stage_sources(stage))
        for stage in _stages().values()
    }
    for name in PIPELINES:
        _sync_file(ROOT / name, closures)


def _sync_file(path: Path, closures: dict[str, list[str]]) -> None:
    out: list[str] = []
    for line in path.read_text().splitlines():
        item = line.strip().removeprefix("- ")
        if line.strip().startswith("- src/opensam/"):
            continue
        out.append(line)
        if line.strip().startswith("- stages/") and item in closures:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}- {dep}" for dep in closures[item])
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    sync_dvc_yaml()  # `python tests/test_dvc_yaml.py` after adding imports to a stage
