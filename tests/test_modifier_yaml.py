"""``<method>+nan`` through the stock ``mergekit-yaml``: slices, filters, gradients, DARE's draws.

Expected tensors come from the stock method given float64 NAN weights
(``support.nan_weights``); each comparison prints its max relative error.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from mergekit.merge_methods import (
    merge_tensors,
)
from support import (
    TOLERANCE,
    load_model_tensors,
    nan_weights,
    relative_error,
    report,
    run_mergekit_yaml,
)

from mergekit_nan import modifiable_methods
from mergekit_nan.commands.tiny import tiny_llama_config, write_family

# --- through the stock mergekit-yaml -----------------------------------------------------

SLICES = ((1, 4), (0, 1))
"""Output layers 0..2 are input layers 1..3, output layer 3 is input layer 0."""
GRADIENTS = {0: [1.0, 0.5], 1: [0.25, 1.0]}
"""Weight of ft1 per slice (the others have 1.0): t = 0, 0.5, 1 in slice 0; t = 1 in slice 1."""
DENSITY = [{"filter": "self_attn", "value": 0.4}, {"filter": "mlp", "value": 0.8}, {"value": 0.6}]


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory):
    """[base, ft0, ft1, ft2], four layers so that slices can reorder and drop layers."""
    config = tiny_llama_config(num_hidden_layers=4)
    return write_family(tmp_path_factory.mktemp("deep"), (0.01, 0.02, 0.04), seed=4, config=config)


def source_of(output_name: str) -> tuple:
    """(input tensor name, slice index, t) for an output tensor of the sliced recipe."""
    if ".layers." not in output_name:
        # embeddings come with the first slice, final norm and head with the last; t = 0
        return output_name, 0 if "embed" in output_name else len(SLICES) - 1, 0.0
    prefix, rest = output_name.split(".layers.", 1)
    index, suffix = rest.split(".", 1)
    position = int(index)
    for slice_index, (start, end) in enumerate(SLICES):
        if position < end - start:
            t = position / (end - start - 1) if end - start > 1 else 1.0
            return f"{prefix}.layers.{start + position}.{suffix}", slice_index, t
        position -= end - start
    raise AssertionError(output_name)


def gradient_value(values: List[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    low = min(int(scaled), len(values) - 2)
    return values[low] + (scaled - low) * (values[low + 1] - values[low])


def density_of(name: str) -> float:
    return 0.4 if "self_attn" in name else 0.8 if "mlp" in name else 0.6


def sliced_recipe(method: str, paths, weights) -> dict:
    """``weights[slice][model]`` is the ``weight`` setting of that source."""
    base, *tuned = paths
    return {
        "merge_method": method,
        "base_model": str(base),
        "slices": [
            {
                "sources": [{"model": str(base), "layer_range": [start, end]}]
                + [
                    {
                        "model": str(p),
                        "layer_range": [start, end],
                        "parameters": {"weight": weights[s][m]},
                    }
                    for m, p in enumerate(tuned)
                ]
            }
            for s, (start, end) in enumerate(SLICES)
        ],
        "parameters": {"density": DENSITY},
        "dtype": "float32",
    }


NAN_WEIGHTS = {s: [1.0, gradient, 1.0] for s, gradient in GRADIENTS.items()}


def expected_inputs(paths):
    base, *tuned = (load_model_tensors(p) for p in paths)
    return base, tuned


def test_mergekit_yaml_ties_with_slices_filters_and_gradient(
    deep_family, tmp_path, record_property
):
    out = tmp_path / "ties_nan"
    run_mergekit_yaml(sliced_recipe("ties+nan", deep_family, NAN_WEIGHTS), out)
    merged = load_model_tensors(out)
    base, tuned = expected_inputs(deep_family)
    assert len({n.split(".layers.")[1].split(".")[0] for n in merged if ".layers." in n}) == 4

    errors = {}
    for name, tensor in merged.items():
        source, slice_index, t = source_of(name)
        total = 2.0 + gradient_value(GRADIENTS[slice_index], t)
        weights = nan_weights([m[source] for m in tuned], base[source], total=total)
        expected = merge_tensors(
            [base[source], *(m[source] for m in tuned)],
            "ties",
            base_index=0,
            parameters={"weight": weights, "density": density_of(source)},
        )
        errors[name] = relative_error(tensor, expected)
    error = max(errors.values())
    report("mergekit-yaml ties+nan (slices, filter, gradient)", error, record_property)
    assert error < TOLERANCE, max(errors, key=errors.get)
    card = (out / "README.md").read_text()
    assert "[TIES with NAN coefficients](https://arxiv.org/abs/2505.16148)" in card


def frozen_nan_weights(paths) -> Dict[int, List[list]]:
    """Stock ``weight`` settings: one filter per input tensor, NAN value precomputed here."""
    base, tuned = expected_inputs(paths)
    names = sorted(base)
    # a filter matches by substring: no tensor name may contain another
    assert not [a for a in names for b in names if a != b and a in b]
    settings = {s: [[] for _ in tuned] for s in range(len(SLICES))}
    for output_name in names:
        source, slice_index, t = source_of(output_name)
        total = 2.0 + gradient_value(GRADIENTS[slice_index], t)
        weights = nan_weights([m[source] for m in tuned], base[source], total=total)
        for column, value in zip(settings[slice_index], weights):
            column.append({"filter": source, "value": value})
    return settings


def test_mergekit_yaml_dare_ties_draws_like_stock_dare_ties(deep_family, tmp_path, record_property):
    """Same --random-seed: the composite equals stock dare_ties given the NAN weights."""
    composite, stock = tmp_path / "dare_ties_nan", tmp_path / "dare_ties"
    run_mergekit_yaml(
        sliced_recipe("dare_ties+nan", deep_family, NAN_WEIGHTS), composite, "--random-seed", "17"
    )
    run_mergekit_yaml(
        sliced_recipe("dare_ties", deep_family, frozen_nan_weights(deep_family)),
        stock,
        "--random-seed",
        "17",
    )
    merged, expected = load_model_tensors(composite), load_model_tensors(stock)
    assert set(merged) == set(expected)
    base = load_model_tensors(deep_family[0])
    for name, tensor in merged.items():
        source = source_of(name)[0]
        # identical DARE masks: exactly the same entries moved away from the base
        assert torch.equal(tensor != base[source], expected[name] != base[source]), name
    error = max(relative_error(merged[n], expected[n]) for n in merged)
    report("mergekit-yaml dare_ties+nan vs stock dare_ties", error, record_property)
    assert error < TOLERANCE


def test_mergekit_yaml_refuses_an_unknown_composite(family, tmp_path):
    base, *tuned = family
    out = tmp_path / "merged"
    result = run_mergekit_yaml(
        {
            "merge_method": "slerp+nan",
            "base_model": str(base),
            "models": [{"model": str(p)} for p in tuned[:1]],
            "parameters": {"t": 0.5},
        },
        out,
        check=False,
    )
    assert result.returncode != 0
    assert "Unknown merge method 'slerp+nan': 'slerp' declares no per-model weight" in result.stderr
    for name in modifiable_methods():
        assert f"{name}+nan" in result.stderr
    assert not out.exists()
