"""The library's shape (docs/architecture.md): layers import one way, a small top level, files of
at most 400 lines, thin stage scripts, and no module that only re-exports another's names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "opensam"
# a layer may import from its own and from lower layers (index = height)
LAYERS = {
    "core": 0, "parallel": 1, "masks": 2, "model": 2, "demo": 3, "data": 3, "eval": 4, "train": 5,
    "apps": 6,
}  # fmt: skip


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[1]).is_dir() else "core"


def _opensam_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opensam."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("opensam.")]
    return out


LIBRARY = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path: Path) -> None:
    rel = path.relative_to(PKG)
    own = rel.parts[0] if len(rel.parts) > 1 else "core"
    bad = [m for m in _opensam_imports(path) if LAYERS[_layer(m)] > LAYERS[own]]
    bad += [m for m in _opensam_imports(path) if LAYERS[_layer(m)] == LAYERS[own] != 0
            and _layer(m) != own]  # fmt: skip
    assert not bad, f"{rel} ({own}) imports upward or sideways: {bad}"


def test_small_top_level_and_subpackages() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    subs = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 8, top
    assert len(subs) >= 5, subs
    assert set(subs) | {"core"} == set(LAYERS), "docs/architecture.md layers and folders differ"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_library_files_are_short(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stage_scripts_are_thin(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 120
    assert not any(m.startswith("stages") for m in _opensam_imports(path))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_no_reexport_only_modules(path: Path) -> None:
    tree = ast.parse(path.read_text())
    body = [
        n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    if path.name == "__init__.py" and path.parent != PKG:
        assert not body, f"{path}: subpackage __init__ files stay empty (import from the owner)"
        return
    defines = [n for n in body if not isinstance(n, ast.Import | ast.ImportFrom)]
    assert defines or path.name == "__init__.py", f"{path}: only imports (a re-export shim)"
    aliased = [a.name for n in body if isinstance(n, ast.ImportFrom) and n.module and
               n.module.startswith("opensam") for a in n.names if a.asname == a.name]  # fmt: skip
    assert not aliased, f"{path}: re-exports {aliased} (callers import from the owner)"
