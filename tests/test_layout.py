"""The library's shape (docs/architecture.md): layers import one way, no import cycle (counting
imports inside functions), no ``_private`` name imported from another module, a small top level,
thin stage scripts, and no module that only re-exports another's names. File size is left to
cohesion, not to a line counter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "opensam"
# a layer may import from its own and from lower layers (index = height)
LAYERS = {
    "core": 0,
    "parallel": 1,
    "masks": 2,
    "model": 2,
    "demo": 3,
    "data": 3,
    "eval": 4,
    "train": 5,
    "apps": 6,
}
LIBRARY = sorted(PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in LIBRARY}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[1]).is_dir() else "core"


def _import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``path``: top level, inside functions, under ``if``."""
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def _opensam_imports(path: Path) -> list[str]:
    out = []
    for node in _import_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opensam."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("opensam.")]
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the opensam modules it imports anywhere}; ``from pkg import mod`` counts as
    importing ``pkg.mod``."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for node in _import_nodes(path):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in MODULES}
            elif node.module in MODULES and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in MODULES else node.module)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as [a, b, ..., a], or [] (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


FACADE = PKG / "__init__.py"  # the public API: above every layer, lazily from apps/api.py
LAYERED = [p for p in LIBRARY if p != FACADE]


@pytest.mark.parametrize("path", LAYERED, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path: Path) -> None:
    rel = path.relative_to(PKG)
    own = rel.parts[0] if len(rel.parts) > 1 else "core"
    bad = [m for m in _opensam_imports(path) if LAYERS[_layer(m)] > LAYERS[own]]
    bad += [
        m
        for m in _opensam_imports(path)
        if LAYERS[_layer(m)] == LAYERS[own] != 0 and _layer(m) != own
    ]
    assert not bad, f"{rel} ({own}) imports upward or sideways: {bad}"


def test_package_init_is_a_lazy_facade() -> None:
    """``opensam/__init__.py`` imports only the API module, and only inside a function or under
    ``if TYPE_CHECKING``: a stage importing ``opensam.config`` loads no torch through it."""
    assert set(_opensam_imports(FACADE)) <= {"opensam.apps", "opensam.apps.api"}
    tree = ast.parse(FACADE.read_text())
    top = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in top if m.startswith("opensam")], top


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle (function-level imports count): " + " -> ".join(cycle)


def test_cycle_finder_finds_a_function_level_cycle() -> None:
    """The check above can fail: a two-module cycle and a three-module one are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_no_private_names_from_other_modules(path: Path) -> None:
    own = _module_name(path)
    private = [
        f"{node.module}.{a.name}"
        for node in _import_nodes(path)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opensam")
        for a in node.names
        if a.name.startswith("_") and node.module != own
    ]
    assert not private, f"{path.relative_to(PKG)} imports private names: {private}"


def test_small_top_level_and_subpackages() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    subs = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 8, top
    assert len(subs) >= 5, subs
    assert set(subs) | {"core"} == set(LAYERS), "docs/architecture.md layers and folders differ"


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md names every library module (``masks/store.py``, ``config.py``)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(PKG))
        for p in LIBRARY
        if p.name != "__init__.py"
        and str(p.relative_to(PKG)) not in text
        and not (p.parent == PKG and f"`{p.name}`" in text)
    ]
    assert not missing, f"docs/architecture.md does not list {missing}"


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
    aliased = [
        a.name
        for n in body
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("opensam")
        for a in n.names
        if a.asname == a.name
    ]
    assert not aliased, f"{path}: re-exports {aliased} (callers import from the owner)"
