"""Granularities (tensor, layer, model) against float64: merges, inspect, slices and LoRA.

Expected coefficients and merges are recomputed here in float64 from the
checkpoint files: whole-model norms sqrt(sum_t ||x_i,t||^2), per-layer norms
over the tensors of one output layer, per-tensor norms outside the layers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import yaml
from support import (
    load_model_tensors,
    nan_alphas,
    run_command,
    run_merge,
    run_mergekit_yaml,
    tensors_of,
    weighted_recipe,
    write_recipe,
)

from mergekit_nan.commands.merge.card import FROZEN_FILE

LAYERS = 2


def layer_of(name: str) -> Optional[int]:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return None if found is None else int(found.group(1))


# -- float64 references -----------------------------------------------------------------------


def task_vectors(models: Sequence[Path], base: Optional[Path]) -> List[Dict[str, torch.Tensor]]:
    """x_i per tensor: theta_i - theta_b with a base, theta_i without."""
    if base is None:
        return [tensors_of(m) for m in models]
    b = tensors_of(base)
    return [{n: t - b[n] for n, t in tensors_of(m).items()} for m in models]


def pooled_norms(
    vectors: List[Dict[str, torch.Tensor]], granularity: str, layer_map: Callable = layer_of
) -> Dict[str, List[float]]:
    """Per output tensor, each model's norm at ``granularity``."""
    names = list(vectors[0])

    def group(name: str):
        if granularity == "model":
            return "all"
        return name if layer_map(name) is None else layer_map(name)

    squares: Dict[object, List[float]] = {}
    for name in names:
        row = squares.setdefault(group(name), [0.0] * len(vectors))
        for i, x in enumerate(vectors):
            row[i] += float((x[name] ** 2).sum())
    return {name: [math.sqrt(s) for s in squares[group(name)]] for name in names}


def expected_nan(
    models: Sequence[Path],
    base: Optional[Path],
    norms: Dict[str, List[float]],
    priors: Sequence[float],
    lam: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """The nan merge with the given norms: base + lam sum a_i x_i, or sum a_i theta_i."""
    out = {}
    for name, row in norms.items():
        a = nan_alphas(row, priors)
        if base is None:
            out[name] = sum(ai * tensors_of(m)[name] for ai, m in zip(a, models))
        else:
            b = tensors_of(base)[name]
            out[name] = b + lam * sum(ai * (tensors_of(m)[name] - b) for ai, m in zip(a, models))
    return out


def assert_merged(out: Path, expected: Dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    got = tensors_of(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


PRIORS = [2.0, 1.0, 1.0]


# -- merge against float64 --------------------------------------------------------------------


def test_model_granularity_with_base_delta_priors_lambda(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", weighted_recipe(family, base=True, **{"lambda": 0.8}))
    run_merge(recipe, tmp_path / "out", "-q", "--granularity", "model")
    norms = pooled_norms(task_vectors(family[1:], family[0]), "model")
    assert_merged(tmp_path / "out", expected_nan(family[1:], family[0], norms, PRIORS, 0.8))
    # The card names NAN, the granularity and the coefficients.
    card = (tmp_path / "out" / "README.md").read_text()
    assert "[NAN](https://arxiv.org/abs/2505.16148)" in card
    assert "**model** granularity" in card
    for value in nan_alphas(norms["lm_head.weight"], PRIORS):
        assert f"{value:.4f}" in card
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == recipe.read_text()
    frozen = yaml.safe_load((tmp_path / "out" / FROZEN_FILE).read_text())
    assert frozen["merge_method"] == "task_arithmetic"


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_pooled_granularity_without_base(family, tmp_path, granularity):
    recipe = write_recipe(tmp_path / "r.yml", weighted_recipe(family, base=False))
    run_merge(recipe, tmp_path / "out", "-q", "--granularity", granularity)
    norms = pooled_norms(task_vectors(family[1:], None), granularity)
    assert_merged(tmp_path / "out", expected_nan(family[1:], None, norms, PRIORS))


def test_layer_granularity_with_base_from_the_recipe(family, tmp_path):
    recipe = weighted_recipe(family, base=True, nan_granularity="layer", **{"lambda": 1.5})
    path = write_recipe(tmp_path / "r.yml", recipe)
    run_merge(path, tmp_path / "out", "-q")
    norms = pooled_norms(task_vectors(family[1:], family[0]), "layer")
    # Outside the layers every tensor keeps its own norms.
    vectors = task_vectors(family[1:], family[0])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert norms[name] == pytest.approx(
            [float(torch.linalg.vector_norm(x[name])) for x in vectors]
        )
    assert_merged(tmp_path / "out", expected_nan(family[1:], family[0], norms, PRIORS, 1.5))
    assert "**layer** granularity" in (tmp_path / "out" / "README.md").read_text()
    # inspect reads the recipe's granularity too.
    result = run_command("mergekit-nan", "inspect", path, "-q", "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "c.json").read_text())["granularity"] == "layer"


def test_layer_granularity_weights_norm_with_base(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", weighted_recipe(family, base=True, nan_norm="weights", nan_exponent=2.0)
    )
    run_merge(recipe, tmp_path / "out", "-q", "--granularity", "layer")
    norms = pooled_norms(task_vectors(family[1:], None), "layer")
    base = tensors_of(family[0])
    got = tensors_of(tmp_path / "out")
    for name, row in norms.items():
        a = nan_alphas(row, PRIORS, 2.0)
        expected = base[name] + sum(
            ai * (tensors_of(m)[name] - base[name]) for ai, m in zip(a, family[1:])
        )
        torch.testing.assert_close(got[name], expected, rtol=0, atol=2e-6, msg=name)


def test_inspect_layer_json_has_pooled_norms(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", weighted_recipe(family, base=True))
    result = run_command(
        "mergekit-nan",
        "inspect",
        recipe,
        "-q",
        "--granularity",
        "layer",
        "--json",
        tmp_path / "c.json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["granularity"] == "layer" and data["model_norms"] is None
    norms = pooled_norms(task_vectors(family[1:], family[0]), "layer")
    layers = {entry["layer"]: list(entry["norms"].values()) for entry in data["layer_norms"]}
    assert sorted(layers) == list(range(LAYERS))
    for layer, values in layers.items():
        assert values == pytest.approx(norms[f"model.layers.{layer}.mlp.up_proj.weight"], rel=1e-6)
    for tensor in data["tensors"]:
        shares = nan_alphas(norms[tensor["name"]], PRIORS)
        assert [m["share"] for m in tensor["models"]] == pytest.approx(shares, rel=1e-6)


# -- slices and LoRA ----------------------------------------------------------------------------


def test_slices_pool_by_output_layer(family, tmp_path):
    """Output layer 0 is every model's input layer 1 and vice versa."""
    sources = lambda first: [  # noqa: E731
        {"model": str(p), "layer_range": [first, first + 1]} for p in family
    ]
    recipe = {
        "merge_method": "nan",
        "base_model": str(family[0]),
        "slices": [{"sources": sources(1)}, {"sources": sources(0)}],
    }
    path = write_recipe(tmp_path / "r.yml", recipe)
    run_merge(path, tmp_path / "out", "-q", "--granularity", "layer")
    vectors = task_vectors(family[1:], family[0])
    norms = pooled_norms(vectors, "layer")  # keyed by input tensor name
    base = tensors_of(family[0])
    expected = {}
    for name in base:
        layer = layer_of(name)
        source = name if layer is None else name.replace(f".{layer}.", f".{1 - layer}.", 1)
        a = nan_alphas(norms[source], [1.0, 1.0, 1.0])
        expected[name] = base[source] + sum(
            ai * (tensors_of(m)[source] - base[source]) for ai, m in zip(a, family[1:])
        )
    assert_merged(tmp_path / "out", expected)


def test_lora_reference_merges_at_model_granularity(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family[1])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(11)
    adapter = tmp_path / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    recipe = {
        "merge_method": "nan",
        "base_model": str(family[0]),
        "models": [{"model": f"{family[1]}+{adapter}"}, {"model": str(family[2])}],
    }
    path = write_recipe(tmp_path / "r.yml", recipe)
    run_merge(path, tmp_path / "merged", "-q", "--granularity", "model")
    result = run_command(
        "mergekit-nan",
        "freeze",
        path,
        "-o",
        tmp_path / "frozen.yml",
        "-q",
        "--granularity",
        "model",
    )
    assert result.returncode == 0, result.stderr
    frozen = yaml.safe_load((tmp_path / "frozen.yml").read_text())
    run_mergekit_yaml(frozen, tmp_path / "stock", "--lora-merge-cache", str(tmp_path / "cache"))
    a, b = load_model_tensors(tmp_path / "merged"), load_model_tensors(tmp_path / "stock")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The adapter moved q/v: model granularity weighs the whole adapted model.
    weights = [s["parameters"]["weight"] for s in frozen["slices"][0]["sources"][:2]]
    plain = pooled_norms(task_vectors(family[1:3], family[0]), "model")["lm_head.weight"]
    assert weights != pytest.approx(nan_alphas(plain, [1.0, 1.0]), rel=1e-6)
