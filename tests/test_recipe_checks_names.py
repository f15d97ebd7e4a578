"""The recipe doctor's findings on names: example recipes, unknown and misspelt parameters, methods."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import yaml
from mergekit.config import MergeConfiguration
from support import finding_codes, only, parsed

from mergekit_nan.doctor.recipe_checks import involves_nan, recipe_findings

EXAMPLES = Path(__file__).resolve().parent.parent / "example_configs"
BASE, FT0, FT1, FT2 = "org/base", "org/ft0", "org/ft1", "org/ft2"


# ----------------------------------------------------------------- example recipes


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.stem)
def test_example_recipes_have_no_warning_or_error(path):
    data = yaml.safe_load(path.read_text())
    assert involves_nan(data)
    assert [f for f in recipe_findings(data) if f.level != "info"] == []
    dumped = MergeConfiguration.model_validate(data).model_dump(mode="json", exclude_none=True)
    assert [f for f in recipe_findings(dumped) if f.level != "info"] == []


def test_the_dumped_configuration_gives_the_same_findings_as_the_yaml():
    data = parsed(f"""
merge_method: ties
base_model: {BASE}
models:
  - model: {FT0}
    parameters: {{weight: 0.5, density: 0.5, nan_exponet: 1}}
  - model: {FT1}+org/adapter
    parameters: {{weight: -0.5, density: 0.5}}
parameters: {{nan_exponent: 1, lambda: .inf}}
""")
    dumped = MergeConfiguration.model_validate(data).model_dump(mode="json", exclude_none=True)
    written = recipe_findings(data)
    assert finding_codes(written) == [
        "forgotten-nan",
        "forgotten-nan",
        "negative-weight",
        "non-finite",
        "zero-weight-total",
    ]
    assert recipe_findings(dumped) == written


# ----------------------------------------------------------------- names


def test_a_typo_in_a_nan_parameter_is_an_unknown_parameter_with_the_right_name():
    data = parsed(f"""
merge_method: nan
base_model: {BASE}
models:
  - model: {FT0}
  - model: {FT1}
    parameters:
      nan_exponet: 2.0
""")
    finding = only(recipe_findings(data), "unknown-parameter")
    assert finding.level == "warning"
    assert finding.where == "models[1].parameters.nan_exponet"
    assert finding.message == (
        "nan has no parameter nan_exponet: mergekit ignores it silently, so the merge "
        "would run as if it were not there"
    )
    assert finding.fix == "did you mean `nan_exponent`?"


@pytest.mark.parametrize(
    "place, where",
    [
        ("top", "parameters.densty"),
        ("model", "models[0].parameters.densty"),
        ("slice", "slices[0].parameters.densty"),
        ("source", "slices[0].sources[1].parameters.densty"),
        ("module", "modules.decoder.parameters.densty"),
    ],
)
def test_unknown_parameters_are_found_at_every_level(place, where):
    setting = {"densty": 0.5}
    sources = [
        {"model": FT0, "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": FT1, "layer_range": [0, 2], "parameters": {"weight": 1.0}},
        {"model": BASE, "layer_range": [0, 2]},
    ]
    output_slice: Dict = {"sources": sources}
    data: Dict = {"merge_method": "ties", "base_model": BASE}
    if place == "top":
        data["parameters"] = setting
    if place == "source":
        sources[1]["parameters"] = {**sources[1]["parameters"], **setting}
    if place == "slice":
        output_slice["parameters"] = setting
    if place == "model":
        data["models"] = [{"model": FT0, "parameters": {"weight": 1.0, **setting}}]
    elif place == "module":
        data["modules"] = {"decoder": {"slices": [output_slice], "parameters": setting}}
    else:
        data["slices"] = [output_slice]
    finding = only(recipe_findings(data), "unknown-parameter")
    assert finding.where == where
    assert finding.fix == "did you mean `density`?"


def test_an_unknown_parameter_without_a_close_name_lists_the_declared_ones():
    data = {"merge_method": "linear", "models": [{"model": FT0, "parameters": {"weight": 1.0}}]}
    data["parameters"] = {"temperature": 0.7}
    finding = only(recipe_findings(data), "unknown-parameter")
    assert finding.fix == "linear declares: weight, normalize"


def test_a_nan_key_on_a_stock_method_is_a_forgotten_nan():
    data = parsed(f"""
merge_method: ties
base_model: {BASE}
models:
  - model: {FT0}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {FT1}
    parameters: {{weight: 0.3, density: 0.5}}
parameters:
  nan_exponent: 1.0
""")
    findings = recipe_findings(data)
    assert len(findings) == 1  # not also reported as an unknown parameter
    finding = findings[0]
    assert (finding.level, finding.code, finding.where) == (
        "warning",
        "forgotten-nan",
        "parameters.nan_exponent",
    )
    assert finding.message == (
        "ties ignores nan_exponent: the merge would use your hand-tuned weights, not NAN's"
    )
    assert finding.fix == "did you mean `ties+nan`?"


def test_a_misspelt_nan_key_on_a_stock_method_suggests_both_fixes():
    data = {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": [{"model": FT0, "parameters": {"weight": 1.0, "nan_nrom": "delta"}}],
    }
    finding = only(recipe_findings(data), "forgotten-nan")
    assert finding.where == "models[0].parameters.nan_nrom"
    assert finding.fix == "did you mean `task_arithmetic+nan` (with `nan_norm`)?"


def test_a_nan_key_on_a_method_without_weights_points_to_nan():
    data = parsed(f"""
merge_method: slerp
base_model: {FT0}
slices:
  - sources:
      - {{model: {FT0}, layer_range: [0, 2]}}
      - {{model: {FT1}, layer_range: [0, 2]}}
parameters: {{t: 0.5, nan_norm: delta}}
""")
    finding = only(recipe_findings(data), "forgotten-nan")
    assert "slerp takes no per-model weight" in finding.message
    assert finding.fix.startswith("use `merge_method: nan`, or one of ")
    assert "ties+nan" in finding.fix


def test_a_recipe_without_a_method():
    findings = recipe_findings({"models": [{"model": FT0}]})
    assert [(f.level, f.code, f.where) for f in findings] == [
        ("error", "unknown-method", "merge_method")
    ]
    assert findings[0].message == "the recipe names no merge_method: mergekit would fail"


@pytest.mark.parametrize(
    "method, message, fix",
    [
        ("tie", "there is no merge method 'tie': mergekit would fail", "did you mean `ties`?"),
        (
            "slerp+nan",
            "Unknown merge method 'slerp+nan': 'slerp' declares no per-model weight",
            "did you mean `nuslerp+nan`?",
        ),
    ],
)
def test_an_unknown_method_is_an_error_with_the_plugins_explanation(method, message, fix):
    data = {"merge_method": method, "models": [{"model": FT0}, {"model": FT1}]}
    findings = recipe_findings(data)
    assert [(f.level, f.code, f.where) for f in findings] == [
        ("error", "unknown-method", "merge_method")
    ]
    assert findings[0].message.startswith(message)
    assert findings[0].fix == fix


def test_a_shared_parameter_given_per_model_is_ignored_by_mergekit():
    data = parsed(f"""
merge_method: ties+nan
base_model: {BASE}
models:
  - model: {FT0}
    parameters: {{density: 0.5, lambda: 0.5}}
  - model: {FT1}
    parameters: {{density: 0.5}}
""")
    finding = only(recipe_findings(data), "ignored-parameter")
    assert (finding.level, finding.where) == ("warning", "models[0].parameters.lambda")
    assert f"this value for model {FT0} is ignored" in finding.message


def test_an_invalid_value_is_an_error_in_the_validators_words():
    data = {"merge_method": "nan", "models": [{"model": FT0}], "parameters": {"nan_norm": "deltas"}}
    finding = only(recipe_findings(data), "invalid-value")
    assert finding.level == "error"
    assert finding.message == (
        "nan_norm: 'deltas' is refused: nan_norm must be one of auto, delta, weights; got 'deltas'"
    )


def test_involves_nan():
    stock = {"merge_method": "linear", "models": [{"model": FT0, "parameters": {"weight": 1}}]}
    assert not involves_nan(stock)
    assert involves_nan({**stock, "merge_method": "nan"})
    assert involves_nan({**stock, "merge_method": "dare_ties+nan"})
    sliced = {
        "merge_method": "task_arithmetic",
        "slices": [{"sources": [{"model": FT0, "layer_range": [0, 2]}]}],
    }
    assert not involves_nan(sliced)
    sliced["slices"][0]["sources"][0]["parameters"] = {"nan_exponent": 1}
    assert involves_nan(sliced)
