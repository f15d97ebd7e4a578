"""Every recipe in example_configs/ parses with mergekit and names only declared parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import get

import mergekit_nan  # noqa: F401  (registers the methods in this process)

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "example_configs").glob("*.yml"))


def parameter_names(config: dict) -> set:
    names = set((config.get("parameters") or {}).keys())
    for model in config.get("models") or []:
        names |= set((model.get("parameters") or {}).keys())
    return names


def test_every_method_has_an_example():
    assert {p.stem for p in EXAMPLES} == {
        "nan",
        "linear+nan",
        "task_arithmetic+nan",
        "ties+nan",
        "dare_ties+nan",
        "della+nan",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_and_resolves(path):
    text = path.read_text()
    assert text.startswith("#"), "each example opens with what changed from the stock recipe"
    raw = yaml.safe_load(text)
    config = MergeConfiguration.model_validate(raw)
    method = get(config.merge_method)
    assert method.spec.name == path.stem
    declared = {p.name for p in method.spec.parameters}
    # mergekit silently ignores undeclared parameters: an example must not rely on one
    assert parameter_names(raw) <= declared
    assert config.dtype == "bfloat16"
    if method.spec.contract.base.value == "required":
        assert config.base_model is not None
