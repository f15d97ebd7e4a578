"""The package as a user installs it: README command 1 in a fresh virtual environment.

Slow (it installs torch, the package and its dependencies from the package index
into a new environment); CI runs it. The wheel's contents are checked on their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, **kwargs
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, REPO)
    (built,) = out.glob("mergekit_nan-*.whl")
    return built


def readme_setup() -> str:
    """README command 1: set up a fresh environment and run the demo."""
    text = (REPO / "README.md").read_text()
    return next(line for line in text.splitlines() if line.startswith("python3 -m venv"))


README_SETUP = readme_setup()
_NOT_COPIED = {".venv", ".git", "__pycache__", ".cache", "build", "dist", ".hypothesis"}


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """README command 1, run as written in a copy of the repository: the demo must run.

    The copy holds the repository's files, not its virtual environment or caches; pip
    installs torch and the package's dependencies from the package index.
    """
    clone = tmp_path_factory.mktemp("clone") / "mergekit-nan"
    shutil.copytree(
        REPO,
        clone,
        ignore=lambda _, names: [
            n for n in names if n in _NOT_COPIED or n.endswith((".egg-info", "_cache"))
        ],
    )
    result = run("bash", "-c", README_SETUP, cwd=clone)
    assert "Check: max |merged - (base + lambda * sum alpha_i delta_i)|" in result.stdout
    return clone / ".venv"


def test_wheel_places_the_start_up_hook_at_its_root(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mergekit_nan.pth", "mergekit_nan.start", "_mergekit_nan_hook.py"} <= names
    assert "mergekit_nan/py.typed" in names
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("mergekit_nan.pth").decode().startswith("import _mergekit_nan_hook;")
        assert archive.read("mergekit_nan.start").decode().strip() == "_mergekit_nan_hook:install"


def test_wheel_requires_safetensors_for_every_install(wheel):
    """The adapter checks, the adapter merge and the demo import safetensors at run time."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    (safetensors,) = [line for line in requires if line.split()[1].startswith("safetensors")]
    assert "extra ==" not in safetensors


@pytest.mark.slow
def test_fresh_environment_start_up_imports_no_torch(fresh_env):
    result = run(fresh_env / "bin" / "python", "-X", "importtime", "-c", "pass")
    modules = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "_mergekit_nan_hook" in modules
    assert not [m for m in modules if m.split(".")[0] in {"torch", "mergekit", "mergekit_nan"}]


@pytest.mark.slow
def test_fresh_environment_stock_mergekit_yaml_runs_nan(fresh_env, family, tmp_path):
    base, *tuned = family
    config = tmp_path / "nan.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "nan",
                "base_model": str(base),
                "models": [{"model": str(p)} for p in tuned],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    run(fresh_env / "bin" / "mergekit-yaml", config, out, "--no-copy-tokenizer", cwd=tmp_path)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    where = run(
        fresh_env / "bin" / "python",
        "-c",
        "import mergekit_nan, mergekit.merge_methods as m; print(mergekit_nan.__file__, m.get('nan'))",
        cwd=tmp_path,
    )
    assert str(fresh_env) in where.stdout
