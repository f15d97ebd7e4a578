"""``<method>+nan``: the stock method, given NAN weights computed independently here.

Every expected value comes from the stock method (mergekit's ``merge_state_dicts`` /
``merge_tensors``) fed with per-tensor weights from ``support.nan_weights``, the
suite's float64 NAN reference. The composite computes its coefficients in
float32 (inputs are float32), so the only admissible difference is that rounding.
Each comparison prints its max relative error (``pytest -s``). The stock
``mergekit-yaml`` runs of the composites are in test_modifier_yaml.py.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerGroupValues,
    PerNonBase,
    TensorGroup,
    get,
    merge_method,
    merge_state_dicts,
    merge_tensors,
)
from support import TOLERANCE, nan_weights, relative_error, report

from mergekit_nan import modifiable_methods, nan_coefficients
from mergekit_nan.errors import RecipeError

MODELS = ("a", "b", "c")


def state_dicts(seed: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """A base and three fine-tunes; task-vector sizes differ per model *and* per tensor."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"blk.attn.w": (48, 32), "blk.mlp.w": (32, 80), "blk.norm": (32,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    models = {"base": base}
    for model in MODELS:
        models[model] = {
            name: tensor
            + float(torch.empty(()).uniform_(0.005, 0.08, generator=generator))
            * torch.randn(tensor.shape, generator=generator)
            for name, tensor in base.items()
        }
    return models


EQUIVALENCE = [
    ("linear", {}),
    ("linear", {"weight": [0.2, 0.3, 0.5]}),
    ("linear", {"weight": [1.0, 1.0, 1.0], "normalize": False}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weight": [1.0, 1.0, 1.0], "lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": [0.3, 0.5, 0.7], "weight": [0.5, 0.3, 0.2], "int8_mask": True}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.4, "weight": [0.6, 0.6, 0.6], "rescale": False}),
    ("dare_linear", {"density": 0.7, "weight": [2.0, 1.0, 1.0]}),
    ("della", {"density": 0.6, "epsilon": 0.1}),
    ("della", {"density": 0.5, "epsilon": 0.2, "lambda": 1.1, "weight": [1.0, 1.0, 1.0]}),
    ("della_linear", {"density": 0.6, "epsilon": 0.1}),
    ("multislerp", {}),
]


@pytest.mark.parametrize(
    "method, parameters", EQUIVALENCE, ids=[f"{m}-{i}" for i, (m, _) in enumerate(EQUIVALENCE)]
)
def test_composite_equals_stock_method_with_nan_weights(method, parameters, record_property):
    models = state_dicts(seed=len(method) + len(parameters))
    base_aware = get(method).spec.contract.base != BasePolicy.IGNORED
    if not base_aware:
        del models["base"]
    names = list(models[MODELS[0]])
    total = sum(parameters["weight"]) if "weight" in parameters else 1.0
    per_tensor = PerGroupValues(
        [
            dict(
                zip(
                    MODELS,
                    nan_weights(
                        [models[m][name] for m in MODELS],
                        models["base"][name] if base_aware else None,
                        total=total,
                    ),
                )
            )
            for name in names
        ]
    )
    base = "base" if base_aware else None

    torch.manual_seed(1234)
    expected = merge_state_dicts(
        models, method, base=base, parameters={**parameters, "weight": per_tensor}
    )
    torch.manual_seed(1234)
    actual = merge_state_dicts(models, f"{method}+nan", base=base, parameters=parameters)

    error = max(relative_error(actual[name], expected[name]) for name in names)
    report(f"{method}+nan {parameters}", error, record_property)
    assert error < TOLERANCE


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_draw_what_the_stock_method_draws(method, record_property):
    """Same seed: same masks. A different seed would differ grossly (the check can fail)."""
    models = state_dicts(seed=11)
    names = list(models["base"])
    weights = PerGroupValues(
        [
            dict(zip(MODELS, nan_weights([models[m][n] for m in MODELS], models["base"][n])))
            for n in names
        ]
    )
    parameters = {"density": 0.3}

    def stock(seed: int) -> Dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return merge_state_dicts(
            models, method, base="base", parameters={**parameters, "weight": weights}
        )

    torch.manual_seed(5)
    composite = merge_state_dicts(models, f"{method}+nan", base="base", parameters=parameters)
    same, other = stock(5), stock(6)
    for name in names:
        kept = composite[name] != models["base"][name]
        assert torch.equal(kept, same[name] != models["base"][name]), name
        assert not torch.equal(kept, other[name] != models["base"][name]), name
    error = max(relative_error(composite[n], same[n]) for n in names)
    report(f"{method}+nan, seeded masks", error, record_property)
    assert error < TOLERANCE


def test_nuslerp_takes_the_nan_ratio(record_property):
    models = state_dicts(seed=3)
    pair = {key: models[key] for key in ("base", "a", "b")}
    name = "blk.mlp.w"
    weights = nan_weights([pair["a"][name], pair["b"][name]], pair["base"][name])
    tensors = [pair[k][name] for k in ("base", "a", "b")]
    expected = merge_tensors(tensors, "nuslerp", base_index=0, parameters={"weight": weights})
    actual = merge_tensors(tensors, "nuslerp+nan", base_index=0)
    error = relative_error(actual, expected)
    report("nuslerp+nan", error, record_property)
    assert error < TOLERANCE


def test_scale_rule_worked_example():
    """Task vectors of norms 1 and 3 with weight 1.0 each: weights 1.5 and 0.5."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, 16, dtype=torch.float64, generator=generator)
    directions = [torch.randn(16, 16, dtype=torch.float64, generator=generator) for _ in "ab"]
    deltas = [
        1.0 * directions[0] / directions[0].norm(),
        3.0 * directions[1] / directions[1].norm(),
    ]
    tuned = [base + d for d in deltas]
    assert nan_weights(tuned, base, total=2.0) == pytest.approx([1.5, 0.5], rel=1e-12)

    given = merge_tensors(
        [base, *tuned], "task_arithmetic+nan", base_index=0, parameters={"weight": [1.0, 1.0]}
    )
    torch.testing.assert_close(given, base + 1.5 * deltas[0] + 0.5 * deltas[1])
    omitted = merge_tensors([base, *tuned], "task_arithmetic+nan", base_index=0)
    torch.testing.assert_close(omitted, base + 0.75 * deltas[0] + 0.25 * deltas[1])


def test_only_a_base_tensor_passes_through_like_the_stock_method():
    """A tensor only the base has (optional weights) is the base, as with the stock method."""
    base = torch.randn(8, 8)
    stock = merge_tensors([base], "task_arithmetic", base_index=0, name="extra")
    assert torch.equal(stock, base)
    assert torch.equal(merge_tensors([base], "task_arithmetic+nan", base_index=0), stock)


@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]])
def test_a_zero_weight_total_is_refused_instead_of_writing_nan(weights):
    """Stock linear divides by the weight sum: a zero total would write NaN."""
    models = {k: v for k, v in state_dicts(seed=6).items() if k != "base"}
    with pytest.raises(RecipeError, match=r"weight total is 0 for tensor 'blk\.\w+\.w'"):
        merge_state_dicts(models, "linear+nan", parameters={"weight": weights})


def test_an_overflowing_weight_total_is_refused_naming_the_parameter():
    models = state_dicts(seed=7)
    with pytest.raises(RecipeError, match=r"weight total = 3e\+38 overflows float16"):
        merge_state_dicts(
            {k: {n: t.half() for n, t in sd.items()} for k, sd in models.items()},
            "task_arithmetic+nan",
            base="base",
            parameters={"weight": [1.0e38, 1.0e38, 1.0e38]},
        )


def test_a_weight_on_some_models_only_is_refused_naming_tensor_and_models():
    models = state_dicts(seed=5)
    with pytest.raises(
        ValueError, match=r"tensor 'blk\.attn\.w' has a weight for some .* not for c"
    ):
        merge_state_dicts(
            models,
            "ties+nan",
            base="base",
            parameters={"density": 0.5, "weight": {"a": 1.0, "b": 1.0, "c": None}},
        )


def test_non_finite_input_is_refused_naming_tensor_and_model():
    models = state_dicts(seed=6)
    models["b"]["blk.mlp.w"][3, 4] = float("nan")
    with pytest.raises(
        ValueError, match=r"NaN or Inf values in tensor 'blk\.mlp\.w' of model\(s\) b"
    ):
        merge_state_dicts(models, "dare_ties+nan", base="base", parameters={"density": 0.5})


def test_base_ignoring_method_has_no_delta_reading():
    models = state_dicts(seed=7)
    del models["base"]
    with pytest.raises(ValueError, match=r"linear ignores the base model.*'blk\.attn\.w'"):
        merge_state_dicts(models, "linear+nan", parameters={"nan_norm": "delta"})


def test_inner_contract_and_validation_are_kept():
    models = state_dicts(seed=8)
    without_base = {k: v for k, v in models.items() if k != "base"}
    with pytest.raises(ValueError, match="requires a base input"):
        merge_state_dicts(without_base, "ties+nan", parameters={"density": 0.5})
    with pytest.raises(TypeError, match="Unknown parameter.*t"):
        merge_state_dicts(models, "ties+nan", base="base", parameters={"t": 0.5})
    with pytest.raises(RecipeError, match="^nan_norm must be one of"):
        merge_state_dicts(models, "ties+nan", base="base", parameters={"nan_norm": "both"})


def test_composite_spec_is_the_inner_spec_plus_nan_parameters():
    for name in modifiable_methods():
        inner, composite = get(name).spec, get(f"{name}+nan").spec
        assert composite.contract == inner.contract
        assert composite.optional_tensor_policy == inner.optional_tensor_policy
        inner_parameters = {p.name: p for p in inner.parameters}
        added = [p for p in composite.parameters if p.name not in inner_parameters]
        assert [p.name for p in added] == ["nan_exponent", "nan_norm", "nan_granularity"]
        for parameter in composite.parameters:
            if parameter.name == "weight":
                assert parameter.default is None and not parameter.required
                assert parameter.scope == inner_parameters["weight"].scope
                assert parameter.validate(None) is None
            elif parameter.name in inner_parameters:
                assert parameter == inner_parameters[parameter.name]
        assert composite.pretty_name == f"{inner.pretty_name or name} with NAN coefficients"
        assert composite.reference_url == "https://arxiv.org/abs/2505.16148"


def test_composites_exist_for_every_weight_taking_method():
    expected = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "nuslerp",
        "multislerp",
    }
    assert set(modifiable_methods()) == expected
    for name in expected:
        assert get(f"{name}+nan").spec.name == f"{name}+nan"


def test_wrapping_refuses_what_it_cannot_modify():
    with pytest.raises(ValueError, match="'slerp' has no per-model weight"):
        nan_coefficients(get("slerp"))
    with pytest.raises(ValueError, match="already uses NAN coefficients"):
        nan_coefficients(get("ties+nan"))
    with pytest.raises(RuntimeError, match=r"'slerp' declares no per-model weight") as error:
        get("slerp+nan")
    for name in modifiable_methods():
        assert f"{name}+nan" in str(error.value)


def test_a_method_from_another_package_can_be_wrapped():
    """A base-aware method defined outside mergekit, wrapped by the public function."""

    @merge_method(name="shifted_sum", contract=InputContract(base=BasePolicy.REQUIRED))
    def shifted_sum(
        group: TensorGroup, weight: PerNonBase[float], shift: float = 0.0
    ) -> torch.Tensor:
        base = group.base.tensor
        return base + shift + sum(weight[e.id] * (e.tensor - base) for e in group.non_base)

    composite = nan_coefficients(shifted_sum)
    assert composite.spec.name == "shifted_sum+nan"
    models = state_dicts(seed=9)
    name = "blk.attn.w"
    tensors = [models[k][name] for k in ("base", *MODELS)]
    weights = nan_weights(tensors[1:], tensors[0], total=3.0)
    expected = tensors[0] + 0.5 + sum(w * (t - tensors[0]) for w, t in zip(weights, tensors[1:]))
    actual = merge_tensors(
        tensors, composite, base_index=0, parameters={"weight": [1.0, 1.0, 1.0], "shift": 0.5}
    )
    assert relative_error(actual, expected) < TOLERANCE
