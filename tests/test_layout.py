"""The package's three parts and the direction of their imports.

The NAN core lives at the package root, the recipe doctor in
``mergekit_nan.doctor`` and the command line in ``mergekit_nan.commands``;
imports run commands -> doctor -> core, never back (read from the source,
including imports inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_nan"
ORDER = {"core": 0, "doctor": 1, "commands": 2}


def part(module: str) -> str:
    """``core``, ``doctor`` or ``commands`` for a ``mergekit_nan`` module name."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[1] in ("doctor", "commands") else "core"


def imports(path: Path) -> Set[str]:
    """Every ``mergekit_nan`` module a source file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "mergekit_nan"}


def modules() -> Dict[str, Path]:
    return {
        ".".join(("mergekit_nan", *path.relative_to(PACKAGE).with_suffix("").parts)): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_the_package_shows_its_three_parts():
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir()} >= {"doctor", "commands"}
    parts = {part(name) for name in modules()}
    assert parts == {"core", "doctor", "commands"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_never_run_back_up(module):
    here = ORDER[part(module)]
    upward = sorted(
        name
        for name in imports(modules()[module])
        if name in modules() or name.rsplit(".", 1)[0] in modules()
        if ORDER[part(name)] > here
    )
    assert upward == [], f"{module} ({part(module)}) imports {upward}"
