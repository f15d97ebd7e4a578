"""The parameter-level findings of the recipe doctor, on the recipe and on a real plan."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from safetensors import safe_open

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.recipe_checks import involves_nan, planned_findings, recipe_findings

EXAMPLES = Path(__file__).resolve().parent.parent / "example_configs"
BASE, FT0, FT1, FT2 = "org/base", "org/ft0", "org/ft1", "org/ft2"


def recipe(text: str) -> Dict:
    return yaml.safe_load(text)


def only(findings: List[Finding], code: str) -> Finding:
    matching = [f for f in findings if f.code == code]
    assert len(matching) == 1, findings
    return matching[0]


def codes(findings: List[Finding]) -> List[str]:
    return sorted(f.code for f in findings)


# ----------------------------------------------------------------- example recipes


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.stem)
def test_example_recipes_have_no_warning_or_error(path):
    data = yaml.safe_load(path.read_text())
    assert involves_nan(data)
    assert [f for f in recipe_findings(data) if f.level != "info"] == []
    dumped = MergeConfiguration.model_validate(data).model_dump(mode="json", exclude_none=True)
    assert [f for f in recipe_findings(dumped) if f.level != "info"] == []


def test_the_dumped_configuration_gives_the_same_findings_as_the_yaml():
    data = recipe(f"""
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
    assert codes(written) == [
        "forgotten-nan",
        "forgotten-nan",
        "negative-weight",
        "non-finite",
        "zero-weight-total",
    ]
    assert recipe_findings(dumped) == written


# ----------------------------------------------------------------- names


def test_a_typo_in_a_nan_parameter_is_an_unknown_parameter_with_the_right_name():
    data = recipe(f"""
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
    data = recipe(f"""
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
    data = recipe(f"""
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
    data = recipe(f"""
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


# ----------------------------------------------------------------- weights


def _models(weights, method="linear", **top):
    data = {
        "merge_method": method,
        "models": [
            {"model": name, "parameters": {} if weight is None else {"weight": weight}}
            for name, weight in zip((FT0, FT1, FT2), weights)
        ],
    }
    if method not in ("linear", "linear+nan"):
        data["base_model"] = BASE
    if top:
        data["parameters"] = top
    return data


def test_a_zero_weight_total_on_linear_is_an_error_because_linear_writes_nan():
    finding = only(recipe_findings(_models([1.0, -0.25, -0.75])), "zero-weight-total")
    assert (finding.level, finding.where) == ("error", "models")
    assert finding.message == (
        f"the weights of {FT0}, {FT1}, {FT2} sum to 0, and linear divides by that sum: "
        "the merged tensors would be NaN or Inf"
    )
    # What the message claims, checked on mergekit's own linear kernel.
    tensors = [torch.randn(4, 3) for _ in range(3)]
    merged = merge_tensors(tensors, "linear", parameters={"weight": [1.0, -0.25, -0.75]})
    assert not torch.isfinite(merged).any()
    # A sum that is zero up to rounding in the recipe is exactly zero in float32.
    rounded = only(recipe_findings(_models([0.1, 0.2, -0.3])), "zero-weight-total")
    assert "sum to 2.77556e-17 (practically 0)" in rounded.message
    merged = merge_tensors(tensors, "linear", parameters={"weight": [0.1, 0.2, -0.3]})
    assert not torch.isfinite(merged).any()
    # Without normalisation the same weights are a legitimate difference.
    assert recipe_findings(_models([1.0, -0.25, -0.75], normalize=False)) == []


def test_all_zero_weights_on_ties_write_the_base_unchanged():
    data = _models([0.0, 0.0], method="ties")
    finding = only(recipe_findings(data), "zero-weight-total")
    assert finding.level == "error"
    assert "ties would add no task vector and write the base model unchanged" in finding.message
    base, a, b = (torch.randn(8, 4) for _ in range(3))
    merged = merge_tensors([base, a, b], "ties", base_index=0, parameters={"weight": 0.0})
    assert torch.equal(merged, base)


def test_negative_weights_depend_on_what_the_method_does_with_them():
    linear = only(recipe_findings(_models([1.0, -0.5])), "negative-weight")
    assert (linear.level, linear.where) == ("warning", "models[1].parameters.weight")
    assert linear.message == (
        f"weight = -0.5 for model {FT1} is negative, and linear divides by the sum of the "
        "weights: the result extrapolates instead of averaging"
    )
    # task_arithmetic subtracts a task vector with a negative weight: nothing to say.
    assert recipe_findings(_models([1.0, -0.5], method="task_arithmetic")) == []
    prior = only(recipe_findings(_models([1.0, -0.5], method="nan")), "negative-weight")
    assert prior.level == "error"
    total = only(recipe_findings(_models([1.0, -0.5], method="ties+nan")), "negative-weight")
    assert total.level == "warning"
    assert "only the sum of the weights counts" in total.message


def test_weight_totals_on_nan_methods():
    zero = only(recipe_findings(_models([0.5, -0.5], "task_arithmetic+nan")), "zero-weight-total")
    assert zero.level == "error"
    assert "that sum is the total of NAN's weights" in zero.message
    priors = only(recipe_findings(_models([0.0, 0.0], "nan")), "zero-weight-total")
    assert priors.level == "error"
    assert priors.message.startswith(f"every weight on nan is 0 ({FT0}, {FT1})")
    # One zero prior leaves the model out, which is fine.
    assert recipe_findings(_models([0.0, 1.0], "nan")) == []


def test_weights_on_some_models_only_of_a_nan_composite():
    finding = only(recipe_findings(_models([1.0, None, 2.0], "ties+nan")), "partial-weights")
    assert (finding.level, finding.where) == ("error", "models")
    assert finding.message.startswith(f"ties+nan has a weight for {FT0}, {FT2} but none for {FT1}")
    # A weight for every model from the top level is not partial.
    assert recipe_findings(_models([None, None, None], "ties+nan", weight=1.0)) == []


def test_the_base_models_weight_does_not_count():
    data = _models([0.5, 0.5], method="ties+nan")
    data["models"].append({"model": BASE})  # the base, listed without a weight
    assert recipe_findings(data) == []


# ----------------------------------------------------------------- values


def test_non_finite_values_are_errors():
    data = recipe(f"""
merge_method: task_arithmetic
base_model: {BASE}
models:
  - model: {FT0}
    parameters: {{weight: 1e400}}
  - model: {FT1}
    parameters:
      weight: [{{filter: mlp, value: .nan}}, {{value: 1.0}}]
parameters:
  lambda: -.inf
""")
    findings = recipe_findings(data)
    assert [(f.code, f.where) for f in findings] == [
        ("non-finite", "parameters.lambda"),
        ("non-finite", "models[0].parameters.weight"),
        ("non-finite", "models[1].parameters.weight[0].value"),
    ]
    assert findings[1].message == (
        f"weight = 1e400 for model {FT0} is not a finite number: the merged tensors would "
        "be NaN or Inf"
    )
    assert all(f.level == "error" for f in findings)
    nan_lambda = recipe_findings(_models([1.0, 1.0], "nan", **{"lambda": float("inf")}))
    assert only(nan_lambda, "non-finite").message == (
        "lambda = inf is not a finite number: the merge would fail"
    )


def test_values_that_overflow_the_dtype_are_errors():
    data = _models([1.0, 1.0], "task_arithmetic", **{"lambda": 1.0e300})
    data["dtype"] = "float16"
    finding = only(recipe_findings(data), "overflow")
    assert (finding.level, finding.where) == ("error", "parameters.lambda")
    assert finding.message == (
        "lambda = 1e+300 overflows float16 (max 65504): the merged tensor would be Inf"
    )
    assert finding.fix == "lower lambda, or merge in float32"
    # mergekit's task arithmetic indeed writes Inf.
    base, a, b = (torch.randn(8, 4, dtype=torch.float16) for _ in range(3))
    merged = merge_tensors(
        [base, a, b], "task_arithmetic", base_index=0, parameters={"weight": 1.0, "lambda": 1e300}
    )
    assert torch.isinf(merged).any()
    # out_dtype narrower than dtype decides.
    data.update(dtype="float32", out_dtype="bfloat16", parameters={"lambda": 1e39})
    assert only(recipe_findings(data), "overflow").message.startswith(
        "lambda = 1e+39 overflows bfloat16 (max 3.38953e+38)"
    )


def test_a_weight_total_beyond_float32_is_an_overflow():
    data = _models([2.0e38, 2.0e38], "task_arithmetic+nan")  # no dtype: float32's range
    finding = only(recipe_findings(data), "overflow")
    assert (finding.level, finding.where) == ("error", "models")
    assert finding.message == (
        f"the weights of {FT0}, {FT1} sum to 4e+38, which overflows float32 "
        "(max 3.40282e+38): the merged tensor would be Inf"
    )
    assert torch.isinf(torch.tensor(2.0e38) + torch.tensor(2.0e38))


# ----------------------------------------------------------------- nan_norm, nan_granularity


def test_delta_without_a_base_names_the_slice():
    data = recipe(f"""
merge_method: nan
slices:
  - sources:
      - {{model: {FT0}, layer_range: [0, 1]}}
      - {{model: {FT1}, layer_range: [0, 1]}}
  - sources:
      - {{model: {FT0}, layer_range: [1, 2]}}
      - {{model: {FT1}, layer_range: [1, 2]}}
      - {{model: {BASE}, layer_range: [1, 2]}}
    base_model: {BASE}
parameters:
  nan_norm: delta
""")
    finding = only(recipe_findings(data), "delta-without-base")
    assert (finding.level, finding.where) == ("error", "parameters.nan_norm")
    assert finding.message == (
        "nan_norm: delta needs a base model (it takes task vectors theta_i - theta_base), "
        f"but there is none for slices[0].sources ({FT0}, {FT1}): the merge would fail"
    )
    data["base_model"] = BASE
    assert recipe_findings(data) == []


def test_delta_on_a_method_that_ignores_the_base():
    data = _models([None, None], "linear+nan")
    data["parameters"] = {"nan_norm": [{"filter": "mlp", "value": "delta"}, {"value": "auto"}]}
    finding = only(recipe_findings(data), "delta-without-base")
    assert finding.where == "parameters.nan_norm[0].value"
    assert finding.message.startswith("linear ignores the base model")


def test_granularity_belongs_in_the_top_level_parameters():
    data = _models([None, None], "nan", nan_granularity="layer")
    finding = only(recipe_findings(data), "granularity-needs-merge")
    assert (finding.level, finding.where) == ("info", "parameters.nan_granularity")
    assert finding.fix == "run `mergekit-nan merge RECIPE OUT_PATH`"
    assert recipe_findings(_models([None, None], "nan", nan_granularity="tensor")) == []
    misplaced = _models([None, None], "ties+nan")
    misplaced["models"][1]["parameters"] = {"nan_granularity": "model"}
    finding = only(recipe_findings(misplaced), "granularity-placement")
    assert (finding.level, finding.where) == ("error", "models[1].parameters.nan_granularity")
    gradient = _models([None, None], "nan", nan_granularity=["tensor", "model"])
    assert only(recipe_findings(gradient), "granularity-placement").level == "error"
    wrong = only(recipe_findings(_models([None], "nan", nan_granularity="layers")), "invalid-value")
    assert wrong.fix == "did you mean `layer`?"


SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.sampled_from(["delta", "weights", "1e400", "nan", "layer", "", "x"]),
)
SETTINGS = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.lists(st.fixed_dictionaries({"value": SCALARS}, optional={"filter": st.text()}), max_size=2),
)
PARAMETERS = st.dictionaries(
    st.sampled_from(["weight", "lambda", "normalize", "nan_norm", "nan_granularity", "nan_x", "t"]),
    SETTINGS,
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["nan", "ties+nan", "linear+nan", "linear", "ties", "nuslerp", "slerp"]),
    top=PARAMETERS,
    per_model=st.lists(PARAMETERS, min_size=1, max_size=3),
    dtype=st.sampled_from([None, "float16", "bfloat16", "float32", "int64", "bogus"]),
    base=st.booleans(),
)
def test_any_recipe_gives_findings_and_never_raises(method, top, per_model, dtype, base):
    data: Dict = {
        "merge_method": method,
        "models": [{"model": f"org/m{i}", "parameters": p} for i, p in enumerate(per_model)],
        "parameters": top,
    }
    if base:
        data["base_model"] = "org/m0"
    if dtype:
        data["dtype"] = dtype
    findings = recipe_findings(data)
    assert all(isinstance(f, Finding) and f.message and f.where for f in findings)
    assert involves_nan(data) == (
        method.endswith("nan") or any(k.startswith("nan_") for p in [top, *per_model] for k in p)
    )


# ----------------------------------------------------------------- planned values


def plan(data: Dict) -> MergePlanner:
    """mergekit's planner over ``data``, planned as mergekit-yaml would, unguarded."""
    config = MergeConfiguration.model_validate(data)
    options = MergeOptions()
    arch_info = get_architecture_info(config, options)
    loaders = LoaderCache()
    loaders.setup(options=options)
    for model in config.referenced_models():
        loaders.get(model)
    planner = MergePlanner(
        config,
        arch_info,
        options=options,
        out_model_config=_model_out_config(config, arch_info, trust_remote_code=False),
    )
    planner._mergekit_nan_unguarded = True
    planner._plan()
    return planner


def tensor_names(model: Path) -> List[str]:
    with safe_open(str(model / "model.safetensors"), framework="pt") as file:
        return list(file.keys())


def zero_mlp(otherwise: float) -> List[Dict]:
    """Weight 0 for the MLP tensors, ``otherwise`` for the rest (mergekit's filter syntax)."""
    return [{"filter": "mlp", "value": 0.0}, {"value": otherwise}]


def test_a_filter_that_zeroes_some_tensors_is_caught_on_the_plan(family):
    _, ft0, ft1, _ = (str(path) for path in family)
    data = {
        "merge_method": "linear",
        "models": [
            {"model": ft0, "parameters": {"weight": zero_mlp(1.0)}},
            {"model": ft1, "parameters": {"weight": zero_mlp(2.0)}},
        ],
    }
    assert recipe_findings(data) == []  # only the resolved values show it
    planner = plan(data)
    findings = planned_findings(planner)
    finding = only(findings, "zero-weight-total")
    mlp = [name for name in tensor_names(family[1]) if "mlp" in name]
    first = next(w.name for w, _ in planner._tensors if "mlp" in w.name)
    assert (finding.level, finding.where, finding.tensor) == ("error", "weight", first)
    assert finding.message == (
        f"the weights of {ft0}, {ft1} sum to 0, and linear divides by that sum: the merged "
        f"tensors would be NaN or Inf (resolved per tensor: {len(mlp)} of "
        f"{len(planner._tensors)} tensors, first {first})"
    )


def test_a_gradient_through_zero_is_caught_on_the_plan(family):
    base, ft0, ft1, _ = (str(path) for path in family)
    data = {
        "merge_method": "task_arithmetic+nan",
        "base_model": base,
        "models": [
            {"model": ft0, "parameters": {"weight": [0.0, 1.0]}},
            {"model": ft1, "parameters": {"weight": [0.0, 1.0]}},
        ],
    }
    assert recipe_findings(data) == []
    planner = plan(data)
    finding = only(planned_findings(planner), "zero-weight-total")
    # Two layers: layer 0 and the tensors outside the layers get t = 0.
    zero = [w.name for w, _ in planner._tensors if ".layers.1." not in w.name]
    assert finding.tensor == zero[0]
    assert f"{len(zero)} of {len(planner._tensors)} tensors" in finding.message


def test_a_filtered_delta_without_a_base_is_caught_on_the_plan(family):
    _, ft0, ft1, _ = (str(path) for path in family)
    data = {
        "merge_method": "nan",
        "models": [{"model": ft0}, {"model": ft1}],
        "parameters": {"nan_norm": [{"filter": "self_attn", "value": "delta"}, {"value": "auto"}]},
    }
    assert recipe_findings(data) == []
    planner = plan(data)
    finding = only(planned_findings(planner), "delta-without-base")
    attention = [w.name for w, _ in planner._tensors if "self_attn" in w.name]
    assert (finding.where, finding.tensor) == ("nan_norm", attention[0])
    assert f"{len(attention)} of {len(planner._tensors)} tensors" in finding.message


def test_plain_values_are_left_to_the_recipe_findings(family):
    base, ft0, ft1, _ = (str(path) for path in family)
    data = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": ft0, "parameters": {"weight": 0.0, "density": 0.5}},
            {"model": ft1, "parameters": {"weight": 0.0, "density": 0.5}},
        ],
    }
    assert codes(recipe_findings(data)) == ["zero-weight-total"]
    assert planned_findings(plan(data)) == []
