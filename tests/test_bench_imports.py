"""The bench/ and tools/ scripts import only names the package has: a refactor that moves a
function breaks them at once, not the next time someone runs a benchmark (bench/mask_quality.py
imported read_prepared_image from the wrong module for a whole session)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("tools/*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_opensam_name_a_script_imports_exists(script: Path) -> None:
    tree = ast.parse(script.read_text(), str(script))
    imported = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opensam")
        for alias in node.names
    ]
    for module, name in imported:
        owner = importlib.import_module(module)
        assert hasattr(owner, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{script.relative_to(ROOT)}: {module} has no {name}"
        )
