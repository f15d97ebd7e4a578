"""mergekit's internals are reached through one module, and the installed mergekit has them.

``mergekit_nan.mergekit_compat`` lists every private mergekit name the plugin
uses (``PRIVATE_NAMES``). The installed mergekit must have each; no other
package module may use a ``_``-prefixed mergekit name, override a private
method or replace a mergekit attribute (read from the source).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import List, Set

import pytest

from mergekit_nan import mergekit_compat
from mergekit_nan.mergekit_compat import PRIVATE_NAMES, missing_private_names

PACKAGE = Path(mergekit_compat.__file__).resolve().parent
COMPAT = PACKAGE / "mergekit_compat.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


def mergekit_private_names() -> Set[str]:
    """Every ``_``-prefixed identifier in the installed mergekit's source."""
    spec = importlib.util.find_spec("mergekit")
    assert spec is not None and spec.submodule_search_locations
    found: Set[str] = set()
    for root in spec.submodule_search_locations:
        for path in Path(root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.add(node.name)
                elif isinstance(node, ast.Attribute):
                    found.add(node.attr)
                elif isinstance(node, ast.Name):
                    found.add(node.id)
    return {name for name in found if _private(name)}


def _mergekit_bound(tree: ast.AST) -> Set[str]:
    """Names a module binds to mergekit's modules, classes and functions by importing them."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mergekit":
                    bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mergekit":
            bound.update(alias.asname or alias.name for alias in node.names)
    return bound


def _root(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def own_private_attributes(sources: List[str]) -> Set[str]:
    """The ``_``-prefixed attributes the plugin assigns itself (its own state)."""
    own = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            own.update(t.attr for t in targets if isinstance(t, ast.Attribute) and _private(t.attr))
    return own


def reaches_past_compat(source: str, private: Set[str], own: Set[str]) -> List[str]:
    """What a module outside ``mergekit_compat`` does with mergekit's internals, one line each."""
    tree = ast.parse(source)
    bound = _mergekit_bound(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mergekit":
            parts = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{line}: imports {part}" for part in parts if _private(part)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mergekit" and any(
                    _private(part) for part in alias.name.split(".")
                ):
                    found.append(f"{line}: imports {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in private - own:
            found.append(f"{line}: uses {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value in private - own:
            found.append(f"{line}: names {node.value!r}")  # getattr(planner, "_plan")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in private:
                    found.append(f"{item.lineno}: overrides {node.name}.{item.name}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and _root(target) in bound:
                    found.append(f"{line}: replaces {ast.unparse(target)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
            and _root(node.args[0]) in bound
        ):
            found.append(f"{line}: {ast.unparse(node)}")
    return sorted(found, key=lambda place: int(place.split(":")[0]))


@pytest.fixture(scope="module")
def private() -> Set[str]:
    return mergekit_private_names()


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda e: f"{e.module}.{e.name}")
def test_the_installed_mergekit_has_the_name(entry):
    if f"{entry.module}.{entry.name}" in missing_private_names():
        version = importlib.metadata.version("mergekit")
        pytest.fail(
            f"mergekit {version} lacks {entry.module}.{entry.name} ({entry.why}): "
            "update mergekit_nan/mergekit_compat.py",
            pytrace=False,
        )


def test_a_name_mergekit_dropped_is_named(monkeypatch):
    from mergekit.plan import MergePlanner

    assert missing_private_names() == []
    monkeypatch.delattr(MergePlanner, "_current_module_layers")
    monkeypatch.setattr(MergePlanner, "__annotations__", {})
    assert missing_private_names() == [
        "mergekit.plan.MergePlanner._tensors",
        "mergekit.plan.MergePlanner._current_module_layers",
    ]


def test_the_table_names_every_private_name_the_door_uses(private):
    used = set()
    for node in ast.walk(ast.parse(COMPAT.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergekit"):
            used.update(alias.name for alias in node.names if alias.name in private)
        elif isinstance(node, ast.FunctionDef) and node.name in private:
            used.add(node.name)
    listed = {entry.name.rsplit(".", 1)[-1] for entry in PRIVATE_NAMES}
    assert used and used <= listed, sorted(used - listed)


def test_no_other_module_reaches_mergekit_internals(private):
    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if path != COMPAT]
    sources = {path: path.read_text(encoding="utf-8") for path in paths}
    own = own_private_attributes(list(sources.values()))
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{place}"
        for path, source in sources.items()
        for place in reaches_past_compat(source, private, own)
    ]
    assert found == [], "use mergekit_nan.mergekit_compat instead:\n" + "\n".join(found)


def test_the_scan_sees_each_way_of_reaching_in(private):
    source = (
        "import mergekit.merge_methods.registry as registry\n"
        "from mergekit.merge import _model_out_config\n"
        "from mergekit.io.tensor_writer import TensorWriter\n"
        "from mergekit.merge_methods.base import GroupMergeMethod\n"
        "def plan(planner):\n"
        "    return planner._tensors\n"
        "class Method(GroupMergeMethod):\n"
        "    def _execute_resolved(self, groups, parameters):\n"
        "        return ()\n"
        "registry.get = len\n"
        "setattr(TensorWriter, 'save_tensor', len)\n"
        "getattr(registry, '_METHODS')\n"
    )
    assert reaches_past_compat(source, private, set()) == [
        "2: imports _model_out_config",
        "6: uses planner._tensors",
        "8: overrides Method._execute_resolved",
        "10: replaces registry.get",
        "11: setattr(TensorWriter, 'save_tensor', len)",
        "12: names '_METHODS'",
    ]
