"""The test suite's own layout: shared helpers live in ``support``, files stay short.

A test module never imports another test module (nor ``conftest``, whose
fixtures pytest hands out): what several test files need lives in the
``support`` package. No file of the suite is longer than :data:`MAX_LINES`
(read from the source with ``ast``, including imports inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Set

import pytest

TESTS = Path(__file__).resolve().parent
MAX_LINES = 450
SOURCES = sorted(TESTS.rglob("*.py"))


def imported_modules(path: Path) -> Set[str]:
    """The top-level names of every absolute import in a source file, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def suite_test_modules() -> Set[str]:
    return {path.stem for path in TESTS.glob("test_*.py")}


def relative(path: Path) -> str:
    return str(path.relative_to(TESTS))


@pytest.mark.parametrize("path", SOURCES, ids=relative)
def test_no_module_imports_a_test_module_or_conftest(path):
    forbidden = suite_test_modules() | {"conftest"}
    assert sorted(imported_modules(path) & forbidden) == [], (
        f"{relative(path)} imports helpers from a test module: move them to tests/support"
    )


@pytest.mark.parametrize("path", SOURCES, ids=relative)
def test_no_file_is_longer_than_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{relative(path)} has {lines} lines: split it along its concepts"


def test_the_layout_checks_see_the_whole_suite():
    names: List[str] = [relative(path) for path in SOURCES]
    assert "conftest.py" in names and "support/__init__.py" in names
    assert "test_test_layout.py" in names and len(suite_test_modules()) > 30


def test_an_import_of_a_test_module_is_found(tmp_path):
    source = tmp_path / "test_example.py"
    source.write_text("def f():\n    from test_method import group\n\nimport conftest\n")
    assert imported_modules(source) == {"test_method", "conftest"}
