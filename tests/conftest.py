"""Shared fixtures: tiny seeded checkpoints (helper functions live in ``support``)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads local task data only

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, List  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from support import write_lora_adapter  # noqa: E402

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


ADAPTER_SPECS = [
    # name, rank, alpha, rsLoRA, targets, modules_to_save, B scale
    ("ad0", 4, 8, False, ["q_proj", "v_proj"], None, 0.05),
    ("ad1", 2, 4, True, ["q_proj", "o_proj", "down_proj"], None, 0.1),
    ("ad2", 8, 8, False, ["q_proj", "v_proj"], ["lm_head"], 0.02),
]


@pytest.fixture(scope="session")
def adapters(family, tmp_path_factory) -> List[Path]:
    """Three PEFT LoRA adapters on the family's base (:data:`ADAPTER_SPECS`, seeds 0-2)."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    return [
        write_lora_adapter(
            family[0],
            root / name,
            seed,
            r=rank,
            lora_alpha=alpha,
            use_rslora=rs,
            target_modules=targets,
            modules_to_save=saved,
            b_scale=scale,
        )
        for seed, (name, rank, alpha, rs, targets, saved, scale) in enumerate(ADAPTER_SPECS)
    ]
