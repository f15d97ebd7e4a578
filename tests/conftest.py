"""Shared fixtures: tiny seeded checkpoints and a runner for the stock mergekit commands."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from stock import run_command  # noqa: E402

from mergekit_nan.commands.tiny import write_family  # noqa: E402
from mergekit_nan.doctor.guard import SKIPPED  # noqa: E402

# Property tests draw a fixed example sequence: a failure reproduces, and no run passes or
# fails by the luck of the draw.
settings.register_profile("mergekit-nan", derandomize=True, database=None)
settings.load_profile("mergekit-nan")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    # The workers share the cores: one torch thread each, so no kernel waits at a
    # thread barrier for a core that the other worker holds.
    torch.set_num_threads(1)


class _GuardSkips(logging.Handler):
    """Collects the log records in which the recipe guard says it skipped its checks."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.skipped: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, SKIPPED):
            self.skipped.append(record.getMessage())


@pytest.fixture(autouse=True)
def guard_skips(request) -> Iterator[List[str]]:
    """What the recipe guard skipped in this test (in this process), one message each.

    The guard skips its checks only when mergekit's internals are not what it
    expects; a test in which it does fails, unless it is marked ``guard_skips``.
    """
    handler = _GuardSkips()
    logger = logging.getLogger("mergekit_nan")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # the guard says what it skipped at INFO (mergekit's -v)
    logger.addHandler(handler)
    try:
        yield handler.skipped
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if handler.skipped and request.node.get_closest_marker("guard_skips") is None:
        pytest.fail("; ".join(handler.skipped), pytrace=False)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> List[Path]:
    """[base, ft0, ft1, ft2]: float32 tiny Llamas, task-vector scales 0.01/0.02/0.04."""
    return write_family(tmp_path_factory.mktemp("family"), (0.01, 0.02, 0.04), seed=0)


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """Tiny random checkpoints of several architectures (``compat_models``), built on use."""
    from compat_models import Families

    return Families(tmp_path_factory.mktemp("families"))


def mergekit_command(name: str) -> str:
    """The console script installed next to this interpreter (the stock command)."""
    path = Path(sys.executable).parent / name
    found = path if path.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return str(found)


def run_mergekit_yaml(
    config: Dict, out: Path, *extra: str, check: bool = True, copy_tokenizer: bool = False
) -> subprocess.CompletedProcess:
    """Write ``config`` next to ``out`` and run the stock ``mergekit-yaml`` on it.

    The command runs in this process (``stock.run_command``). The tiny fixtures
    have no tokenizer, so ``--no-copy-tokenizer`` is passed unless ``copy_tokenizer``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{out.name}.yml"
    config_path.write_text(yaml.safe_dump(config))
    copy = () if copy_tokenizer else ("--no-copy-tokenizer",)
    result = run_command("mergekit-yaml", str(config_path), str(out), *copy, *extra)
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{result.stderr[-4000:]}")
    return result


def family_recipe(family: Sequence[Path], method: str = "nan", **parameters) -> Dict:
    """A float32 recipe: ``family[0]`` as the base, the others as the models, ``parameters`` on top."""
    base, *tuned = family
    recipe: Dict = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p)} for p in tuned],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def load_model_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (any number of shards)."""
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
