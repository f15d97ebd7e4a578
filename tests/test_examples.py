"""The recipes in example_configs/: valid for mergekit, fully declared, and runnable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import get
from mergekit.options import MergeOptions
from support import load_model_tensors

EXAMPLES = Path(__file__).resolve().parent.parent / "example_configs"
METHODS = ("nan", "linear+nan", "task_arithmetic+nan", "ties+nan", "dare_ties+nan", "della+nan")


def named_parameters(recipe: dict) -> set:
    """Every parameter name a recipe sets, globally or per model/slice source."""
    names = set(recipe.get("parameters") or {})
    sources = list(recipe.get("models") or [])
    for output_slice in recipe.get("slices") or []:
        sources.extend(output_slice["sources"])
    for source in sources:
        names.update(source.get("parameters") or {})
    return names


def test_there_is_one_example_per_promised_method():
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == sorted(f"{m}.yml" for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_example_is_a_valid_recipe_for_its_method(method):
    text = (EXAMPLES / f"{method}.yml").read_text()
    recipe = yaml.safe_load(text)
    config = MergeConfiguration.model_validate(recipe)
    assert config.merge_method == method
    resolved = get(config.merge_method)
    assert resolved.spec.name == method

    # mergekit silently ignores parameters a method does not declare
    declared = {p.name for p in resolved.spec.parameters}
    assert named_parameters(recipe) <= declared, named_parameters(recipe) - declared

    inputs = [m.model for m in config.models]
    if config.base_model is not None and config.base_model not in inputs:
        inputs.append(config.base_model)
    resolved.validate_inputs(inputs, config.base_model)

    # written like a community recipe: Hugging Face ids, bfloat16
    assert config.dtype == "bfloat16"
    for reference in config.referenced_models():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", reference.model.path), reference

    # a leading comment says which stock recipe it replaces and what changed
    header = text.split("\nmerge_method:")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    stock = "task_arithmetic" if method == "nan" else method.removesuffix("+nan")
    assert f"Stock recipe this replaces: `merge_method: {stock}`" in header
    assert "What changed:" in header


def local_recipe(method: str, family) -> dict:
    """The example with its models mapped onto the tiny family (which ships no tokenizer)."""
    recipe = yaml.safe_load((EXAMPLES / f"{method}.yml").read_text())
    base, *tuned = family
    mapping = {}
    if "base_model" in recipe:
        mapping[recipe["base_model"]] = str(base)
    for entry in recipe["models"]:
        if entry["model"] not in mapping:
            mapping[entry["model"]] = str(tuned[len(mapping) - ("base_model" in recipe)])
    recipe.pop("tokenizer", None)
    if "base_model" in recipe:
        recipe["base_model"] = mapping[recipe["base_model"]]
    for entry in recipe["models"]:
        entry["model"] = mapping[entry["model"]]
    return recipe


@pytest.mark.parametrize("method", METHODS)
def test_example_merges_tiny_models(method, family, tmp_path):
    config = MergeConfiguration.model_validate(local_recipe(method, family))
    out = tmp_path / "merged"
    options = MergeOptions(copy_tokenizer=False, random_seed=0, quiet=True)
    run_merge(config, str(out), options=options)

    merged = load_model_tensors(out)
    inputs = [load_model_tensors(p) for p in family]
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert bool(torch.isfinite(tensor).all()), name
    # a real merge: not a copy of any input
    for source in inputs:
        assert any(
            not torch.equal(tensor, source[name].to(torch.bfloat16))
            for name, tensor in merged.items()
        )
