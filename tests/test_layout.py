"""The package's layers and the direction of their imports.

From the bottom up: the pure math (plain torch, no mergekit at all), the one
door to mergekit's private internals (``mergekit_compat``), the NAN core
inside mergekit, the recipe doctor, then the command line's subpackages in
their own order (``common``, ``inspection``, ``adapters``, ``merge``,
``compare``) and the commands' top level (``cli``, ``demo``, ``tiny``). A
module imports only from its own layer or those below it (read from the
source, including imports inside functions). No module is named after a
standard-library module, no package module is over 400 lines and the
commands' top level keeps at most ten modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_nan"
PURE_MATH = (
    "coefficients",
    "errors",
    "evaluation",
    "lora",
    "norms",
    "shared_norms",
    "worker_pool",
)
LAYERS = (
    "math",
    "compat",
    "core",
    "doctor",
    "commands.common",
    "commands.inspection",
    "commands.adapters",
    "commands.merge",
    "commands.compare",
    "commands",
)
ORDER = {layer: index for index, layer in enumerate(LAYERS)}


def layer(module: str) -> str:
    """The layer of a ``mergekit_nan`` module name."""
    pieces = module.split(".")[1:]
    if not pieces or pieces[0] == "__init__":
        return "core"
    if pieces[0] == "commands":
        if len(pieces) > 2 and f"commands.{pieces[1]}" in ORDER:
            return f"commands.{pieces[1]}"
        return "commands"
    if pieces[0] == "doctor":
        return "doctor"
    if pieces[0] == "mergekit_compat":
        return "compat"
    return "math" if pieces[0] in PURE_MATH else "core"


def imports(path: Path) -> Set[str]:
    """Every module a source file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules() -> Dict[str, Path]:
    return {
        ".".join(("mergekit_nan", *path.relative_to(PACKAGE).with_suffix("").parts)): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_the_package_shows_its_layers():
    assert {layer(name) for name in modules()} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_never_run_back_up(module):
    here = ORDER[layer(module)]
    known = modules()
    upward = sorted(
        name
        for name in imports(known[module])
        if name.split(".")[0] == "mergekit_nan"
        if name in known or name.rsplit(".", 1)[0] in known
        if ORDER[layer(name if name in known else name.rsplit(".", 1)[0])] > here
    )
    assert upward == [], f"{module} ({layer(module)}) imports {upward}"


@pytest.mark.parametrize("module", [f"mergekit_nan.{name}" for name in PURE_MATH])
def test_the_pure_math_imports_no_mergekit(module):
    found = sorted(name for name in imports(modules()[module]) if name.split(".")[0] == "mergekit")
    assert found == [], f"{module} imports {found}"


def test_no_module_is_named_after_the_standard_library():
    clashes = sorted(
        name
        for name in modules()
        if name.rsplit(".", 1)[-1] in sys.stdlib_module_names  # type: ignore[attr-defined]
    )
    assert clashes == []


def test_modules_stay_focused():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_the_commands_top_level_stays_small():
    top = [path for path in (PACKAGE / "commands").glob("*.py")]
    assert len(top) <= 10, sorted(path.name for path in top)
