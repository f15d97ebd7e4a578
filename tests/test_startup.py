"""The start-up hook: lazy, harmless at start-up, idempotent, and seen by the stock tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
from mergekit.merge_methods import registry

import _mergekit_nan_hook as hook
from mergekit_nan.registration import register_methods


def run_python(*args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(__file__),
    )


def imported_modules(importtime_stderr: str) -> list[str]:
    return [
        line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if "|" in line
    ]


def test_start_up_imports_only_the_hook():
    result = run_python("-X", "importtime", "-c", "pass")
    assert result.returncode == 0, result.stderr
    modules = imported_modules(result.stderr)
    assert "_mergekit_nan_hook" in modules, "the .pth start-up hook did not run"
    assert not [m for m in modules if m.split(".")[0] in {"torch", "mergekit", "mergekit_nan"}]
    line = next(x for x in result.stderr.splitlines() if x.endswith("_mergekit_nan_hook"))
    cumulative_us = int(re.split(r"\s*\|\s*", line.split(":", 1)[1].strip())[1])
    assert cumulative_us < 30_000


def test_stock_lookup_finds_nan_after_plain_import():
    result = run_python(
        "-c",
        "from mergekit.merge_methods import get, registered_methods\n"
        "print(get('nan').spec.pretty_name, get('ties+nan').spec.pretty_name)\n"
        "names = [m.spec.name for m in registered_methods()]\n"
        "assert len(names) == len(set(names))\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "NAN TIES with NAN coefficients"
    assert "Warning" not in result.stderr


def test_broken_mergekit_leaves_python_working(tmp_path):
    broken = tmp_path / "mergekit"
    (broken / "merge_methods").mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "merge_methods" / "__init__.py").write_text("raise ImportError('broken install')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert run_python("-c", "print('alive')", env_extra=env).stdout.strip() == "alive"
    result = run_python("-c", "import mergekit.merge_methods", env_extra=env)
    # mergekit's own error reaches the user unchanged
    assert result.stderr.strip().endswith("ImportError: broken install")


def test_install_and_register_are_idempotent():
    hook.install()
    hook.install()
    assert sum(getattr(f, "_mergekit_nan", False) for f in sys.meta_path) == 1
    before = [m.spec.name for m in registry.registered_methods()]
    register_methods()
    hook.register()
    assert [m.spec.name for m in registry.registered_methods()] == before
    assert before.count("nan") == 1 and before.count("dare_ties+nan") == 1


def test_registration_failure_warns_instead_of_raising(monkeypatch):
    import mergekit_nan.registration as registration

    def broken():
        raise RuntimeError("incompatible mergekit")

    monkeypatch.setattr(registration, "register_methods", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook.register()
    assert any("incompatible mergekit" in str(w.message) for w in caught)


def test_unknown_composite_lists_the_modifiable_methods():
    from mergekit.merge_methods import get

    with pytest.raises(RuntimeError, match=r"'slerp' declares no per-model weight.*ties\+nan"):
        get("slerp+nan")
    with pytest.raises(RuntimeError, match=r"no merge method 'tie'"):
        get("tie+nan")
    with pytest.raises(RuntimeError, match="Unimplemented merge method"):
        get("no-such-method")
