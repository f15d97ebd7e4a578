"""The recipe doctor's findings on values: weights, non-finite and overflowing values,
nan_norm and nan_granularity, any recipe, and values on a real plan."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
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
from support import finding_codes, only, parsed

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.recipe_checks import involves_nan, planned_findings, recipe_findings

BASE, FT0, FT1, FT2 = "org/base", "org/ft0", "org/ft1", "org/ft2"


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
    data = parsed(f"""
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
    data = parsed(f"""
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
    assert finding_codes(recipe_findings(data)) == ["zero-weight-total"]
    assert planned_findings(plan(data)) == []
