"""Keep each DVC stage's source deps equal to what its script imports, folder by folder.

A stage depends on its script, on every top-level module of ``src/opensam/`` it reaches, and on
every subpackage folder (``src/opensam/masks`` ...) it reaches through imports (top level or
inside functions, followed transitively). Editing any file of a folder the stage uses reruns it;
editing a folder it does not use does not. A stage run through the launcher
(``python -m opensam.apps.launch --nproc ... stages/x.py``) also depends on that one file,
``src/opensam/apps/launch.py`` (standard library only), not on all of ``apps/``.

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
    """The stage's src deps: top-level module files, and subpackage folders as a whole."""
    deps: set[str] = set()
    for rel in module_closure(script, root):
        parts = rel.relative_to(PKG).parts
        if parts == ("__init__.py",):
            continue
        deps.add(str(PKG / parts[0]) if len(parts) > 1 else str(rel))
    return sorted(deps)


def stage_deps(script: Path, launched: bool, root: Path = ROOT) -> list[str]:
    """:func:`source_deps`, plus :data:`LAUNCHER` for a launched stage (unless all of
    ``apps/`` is a dep already)."""
    deps = source_deps(script, root)
    if launched and str(PKG / "apps") not in deps:
        deps = sorted({*deps, LAUNCHER})
    return deps


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
        print(f"stale src deps in {', '.join(stale)}: run python tools/dvc_deps.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
