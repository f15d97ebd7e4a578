"""Granularities and the stock commands: merge equals freeze + stock, refusals, measurement.

"merge equals freeze + stock" runs the stock ``mergekit-yaml`` on the recipe
that ``mergekit-nan freeze`` wrote.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import get
from support import (
    assert_clean_failure,
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
from mergekit_nan.commands.tiny import write_model
from mergekit_nan.errors import RecipeError
from mergekit_nan.granularity import recipe_granularity, resolve_granularity

# -- merge == freeze + stock mergekit-yaml -----------------------------------------------------


def composite_recipe(family, method: str) -> Dict:
    recipe = {
        "merge_method": method,
        "base_model": str(family[0]),
        "parameters": {"density": 0.6},
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family[1:]],
    }
    if method == "nan":
        recipe = weighted_recipe(family, base=True, **{"lambda": 0.9})
    return recipe


@pytest.mark.parametrize(
    "method, granularity",
    [
        ("nan", "layer"),
        ("nan", "model"),
        ("ties+nan", "layer"),
        ("ties+nan", "model"),
        ("dare_ties+nan", "layer"),
        ("dare_ties+nan", "model"),
    ],
)
def test_merge_equals_freeze_then_stock(family, tmp_path, method, granularity):
    recipe = write_recipe(tmp_path / "r.yml", composite_recipe(family, method))
    seed = ("--random-seed", "7")
    run_merge(
        recipe,
        tmp_path / "merged",
        "-q",
        "--granularity",
        granularity,
        "--save-frozen",
        tmp_path / "saved.yml",
        *seed,
    )
    frozen_path = tmp_path / "frozen.yml"
    result = run_command(
        "mergekit-nan", "freeze", recipe, "-o", frozen_path, "-q", "--granularity", granularity
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "saved.yml").read_text() == frozen_path.read_text()
    frozen = yaml.safe_load(frozen_path.read_text())
    assert "nan" not in frozen["merge_method"]
    run_mergekit_yaml(frozen, tmp_path / "stock", *seed)
    a, b = load_model_tensors(tmp_path / "merged"), load_model_tensors(tmp_path / "stock")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "merged" / "config.json").read_text() == (
        tmp_path / "stock" / "config.json"
    ).read_text()


def test_tensor_granularity_is_bit_identical_to_stock(family, tmp_path):
    recipe = composite_recipe(family, "dare_ties+nan")
    stock_recipe = dict(recipe)
    # The command line wins over the recipe's nan_granularity.
    recipe["parameters"] = {**recipe["parameters"], "nan_granularity": "model"}
    path = write_recipe(tmp_path / "r.yml", recipe)
    run_merge(path, tmp_path / "merged", "-q", "--granularity", "tensor", "--random-seed", "3")
    run_mergekit_yaml(stock_recipe, tmp_path / "stock", "--random-seed", "3")
    a, b = load_model_tensors(tmp_path / "merged"), load_model_tensors(tmp_path / "stock")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "**tensor** granularity" in card and "DARE TIES with NAN coefficients" in card
    assert not (tmp_path / "merged" / FROZEN_FILE).exists()


# -- the stock commands and misplaced values ---------------------------------------------------


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_stock_mergekit_yaml_refuses_pooled_granularity(family, tmp_path, granularity):
    recipe = weighted_recipe(family, base=True, nan_granularity=granularity)
    out = tmp_path / "out"
    result = run_mergekit_yaml(recipe, out, check=False)
    assert result.returncode != 0
    assert f"nan_granularity: {granularity}" in result.stderr
    assert "run `mergekit-nan merge RECIPE OUT_PATH`" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["nan", "ties+nan", "dare_ties+nan"])
def test_every_nan_method_refuses_pooled_granularity_while_planning(method):
    """The parameter itself: what a planner that reaches it sees, with no guard in front."""
    (spec,) = [p for p in get(method).spec.parameters if p.name == "nan_granularity"]
    assert spec.default == "tensor" and spec.validate("tensor") == "tensor"
    for value, words in (
        ("model", "needs the norms of the whole model"),
        ("layer", "needs the norms of every tensor of a layer"),
    ):
        with pytest.raises(RecipeError) as error:
            spec.validate(value)
        assert words in str(error.value)
        assert "run `mergekit-nan merge RECIPE OUT_PATH` (or set nan_granularity: tensor)" in str(
            error.value
        )
    with pytest.raises(RecipeError, match="one of tensor, layer, model; got 'per-layer'"):
        spec.validate("per-layer")


def test_recipe_granularity_is_one_top_level_value():
    def config(parameters=None, model_parameters=None) -> MergeConfiguration:
        return MergeConfiguration.model_validate(
            {
                "merge_method": "nan",
                "parameters": parameters,
                "models": [{"model": "a", "parameters": model_parameters}, {"model": "b"}],
            }
        )

    assert recipe_granularity(config()) is None
    assert recipe_granularity(config({"nan_granularity": "layer"})) == "layer"
    assert resolve_granularity(config({"nan_granularity": "layer"}), "model") == "model"
    assert resolve_granularity(config(), None) == "tensor"
    with pytest.raises(RecipeError, match=r"models\[0\] \(a\)"):
        recipe_granularity(config(model_parameters={"nan_granularity": "model"}))
    with pytest.raises(RecipeError, match="not a filter or gradient"):
        recipe_granularity(config({"nan_granularity": [{"filter": "mlp", "value": "model"}]}))
    with pytest.raises(RecipeError, match="one of tensor, layer, model; got 'layers'"):
        recipe_granularity(config({"nan_granularity": "layers"}))


def test_misplaced_granularity_fails_before_writing(family, tmp_path):
    recipe = weighted_recipe(family, base=True)
    recipe["models"][1]["parameters"] = {"nan_granularity": "layer"}
    path = write_recipe(tmp_path / "r.yml", recipe)
    out = tmp_path / "out"
    result = run_command("mergekit-nan", "merge", path, out, "-q", "--no-copy-tokenizer")
    assert_clean_failure(result, out, "nan_granularity", "models[1]", "top-level")


def test_failed_norm_pass_writes_nothing(family, tmp_path):
    state = {k: v.float().clone() for k, v in tensors_of(family[2]).items()}
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    broken = write_model(tmp_path / "broken", state)
    recipe = weighted_recipe(family, base=True)
    recipe["models"][1]["model"] = str(broken)
    path = write_recipe(tmp_path / "r.yml", recipe)
    out, frozen = tmp_path / "out", tmp_path / "frozen.yml"
    result = run_command(
        "mergekit-nan", "merge", path, out, "-q", "--granularity", "layer", "--save-frozen", frozen
    )
    assert_clean_failure(result, out, "model.layers.1.mlp.down_proj.weight", str(broken))
    assert not frozen.exists()


# -- inspect runs mergekit's own merge adapter -------------------------------------------------


def adapter_task(method: str, **parameters):
    """mergekit's merge task for one optional tensor of /m/base, /m/a and /m/b."""
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.io.tasks import GatherTensors
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    models = [ModelReference.parse(f"/m/{name}") for name in ("base", "a", "b")]
    weight = WeightInfo(name="extra.weight", optional=True)
    shared = {"nan_exponent": 1.0, "nan_norm": "auto", "nan_granularity": "tensor", **parameters}
    per_model = {"weight": 1.0} if method == "nan" else {"weight": None, "density": 1.0}
    merge = ExecuteMergeMethodTask(
        method_name=method,
        gather_tensors=GatherTensors(weight_info=ImmutableMap(data={m: weight for m in models})),
        model_order=tuple(models),
        base_model=models[0],
        output_weight=weight,
        parameters=ImmutableMap(data=shared),
        input_parameters=ImmutableMap(
            data={
                models[0]: ImmutableMap(data={}),
                **{m: ImmutableMap(data=per_model) for m in models[1:]},
            }
        ),
    )
    return merge, models


def test_measurement_follows_mergekits_adapter():
    from mergekit_nan.commands.inspection.coefficient_pass import _CoefficientTask
    from mergekit_nan.measure import measuring

    merge, (base, a, b) = adapter_task("nan", **{"lambda": 1.0})
    task = _CoefficientTask(merge=merge)
    generator = torch.Generator().manual_seed(0)
    values = {m: torch.randn(4, 4, generator=generator) for m in (base, a, b)}
    weighting = task.execute(tensors=values)
    deltas = [torch.linalg.vector_norm((values[m] - values[base]).double()).item() for m in (a, b)]
    assert weighting.models == (a, b)
    assert list(weighting.shares) == pytest.approx(nan_alphas(deltas, [1.0, 1.0]), rel=1e-6)
    # mergekit passes an optional tensor that only one input has through: no NAN.
    assert task.execute(tensors={a: values[a]}) is None
    assert torch.equal(merge.execute(tensors={a: values[a]}), values[a])
    # Equal non-floating buffers are copied, not weighed.
    ints = torch.arange(4)
    assert task.execute(tensors={m: ints for m in (base, a, b)}) is None
    # Outside the measurement the same adapter merges as usual.
    merged = merge.execute(tensors=values)
    a_, b_ = nan_alphas(deltas, [1.0, 1.0])
    expected = values[base] + a_ * (values[a] - values[base]) + b_ * (values[b] - values[base])
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    with measuring():
        assert merge.execute(tensors=values).shares == weighting.shares


def test_measurement_of_a_composite_with_only_the_base_is_none():
    from mergekit_nan.commands.inspection.coefficient_pass import _CoefficientTask

    merge, (base, a, b) = adapter_task("ties+nan")
    task = _CoefficientTask(merge=merge)
    values = {m: torch.full((3,), float(i)) for i, m in enumerate((base, a, b))}
    assert task.execute(tensors={base: values[base]}) is None
    weighting = task.execute(tensors=values)
    assert weighting.weights == pytest.approx(nan_alphas([1.0 * 3**0.5, 2.0 * 3**0.5], [1, 1]))
