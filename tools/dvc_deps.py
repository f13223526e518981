"""Keep each DVC stage's source deps equal to the library files its script imports.

A stage depends on its script and on every ``src/opensam`` module file it reaches through
imports (top level or inside functions, followed transitively), file by file: editing a module
reruns exactly the stages that import it, and a docstring edit in a module that only ``predict``
uses reruns no stage of the main pipeline. Package ``__init__.py`` files are left out: the
subpackages' are empty (tests/test_layout.py) and the top-level one holds the notebook API,
which no stage imports. A stage run through the launcher
(``python -m opensam.apps.launch --nproc ... stages/x.py``) also depends on
``src/opensam/apps/launch.py`` (standard library only).

    python tools/dvc_deps.py          # rewrite dvc.yaml and predict/dvc.yaml
    python tools/dvc_deps.py --check  # exit 1 and list the differences (tests/test_dvc_yaml.py)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = Path("src", "opensam")
PIPELINES = ("dvc.yaml", "predict/dvc.yaml")  # predict/ is off the main path, wdir = root
LAUNCHER = str(PKG / "apps" / "launch.py")
LAUNCH_CMD = "-m opensam.apps.launch"


def imported_modules(path: Path) -> set[str]:
    """opensam module names imported anywhere in ``path`` (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "opensam" or node.module.startswith("opensam."):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("opensam."))
    return found


def _module_file(root: Path, module: str) -> Path | None:
    base = root / Path("src", *module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """Repo-relative paths of every opensam module file reachable from ``script``."""
    seen: set[Path] = set()
    todo = list(imported_modules(script))
    while todo:
        found = _module_file(root, todo.pop())
        if found is None or found.relative_to(root) in seen:
            continue
        seen.add(found.relative_to(root))
        todo.extend(imported_modules(found))
    return seen


def source_deps(script: Path, root: Path = ROOT) -> list[str]:
    """The stage's src deps: every opensam module file it reaches, except ``__init__.py``."""
    return sorted(str(rel) for rel in module_closure(script, root) if rel.name != "__init__.py")


def stage_deps(script: Path, launched: bool, root: Path = ROOT) -> list[str]:
    """:func:`source_deps`, plus :data:`LAUNCHER` and what it imports for a launched stage."""
    deps = set(source_deps(script, root))
    if launched:
        deps |= {LAUNCHER, *source_deps(root / LAUNCHER, root)}
    return sorted(deps)


def stages_using(path: str, root: Path = ROOT) -> list[str]:
    """The stages whose declared deps include ``path`` (a repo-relative file): the stages an
    edit of that file reruns."""
    out = []
    for name in PIPELINES:
        for stage, spec in yaml.safe_load((root / name).read_text())["stages"].items():
            deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
            if any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps):
                out.append(stage)
    return sorted(out)


def launched_scripts(root: Path = ROOT) -> set[str]:
    """Scripts of the stages whose cmd runs them through the launcher."""
    out: set[str] = set()
    for name in PIPELINES:
        for spec in yaml.safe_load((root / name).read_text())["stages"].values():
            match = re.search(r"(stages/\w+\.py)", spec["cmd"])
            if match is not None and LAUNCH_CMD in spec["cmd"]:
                out.add(match.group(1))
    return out


def stage_scripts(root: Path = ROOT) -> dict[str, str]:
    """``{stage name: script path}`` of every stage of the pipelines."""
    out: dict[str, str] = {}
    for name in PIPELINES:
        for stage, spec in yaml.safe_load((root / name).read_text())["stages"].items():
            match = re.search(r"(stages/\w+\.py)", spec["cmd"])
            if match is None:
                raise SystemExit(f"{name}: stage {stage}: no stages/<name>.py in its cmd")
            out[stage] = match.group(1)
    return out


def declared_src_deps(root: Path, stage: str) -> set[str]:
    """The ``src/`` deps that dvc.yaml (or predict/dvc.yaml) declares for ``stage``."""
    for name in PIPELINES:
        stages = yaml.safe_load((root / name).read_text())["stages"]
        if stage in stages:
            deps = stages[stage].get("deps", [])
            return {d for d in deps if isinstance(d, str) and d.startswith("src/")}
    return set()


def sync_file(path: Path, closures: dict[str, list[str]]) -> str:
    """``path``'s text with every stage's ``src/opensam`` deps replaced by ``closures``."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        item = line.strip().removeprefix("- ")
        if line.strip().startswith("- src/opensam"):
            continue
        out.append(line)
        if line.strip().startswith("- stages/") and item in closures:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}- {dep}" for dep in closures[item])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    scripts = set(stage_scripts(args.root).values())
    launched = launched_scripts(args.root)
    closures = {s: stage_deps(args.root / s, s in launched, args.root) for s in scripts}
    stale = []
    for name in PIPELINES:
        path = args.root / name
        text = sync_file(path, closures)
        if text != path.read_text():
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        for stage, script in sorted(stage_scripts(args.root).items()):
            declared = declared_src_deps(args.root, stage)
            wanted = set(closures[script])
            for dep in sorted(wanted - declared):
                print(f"{stage}: missing {dep}")
            for dep in sorted(declared - wanted):
                print(f"{stage}: extra {dep}")
        print(f"stale src deps in {', '.join(stale)}: run python tools/dvc_deps.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
