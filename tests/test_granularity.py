"""Granularities (tensor, layer, model) and the one-command ``mergekit-nan merge``.

Expected coefficients and merges are recomputed here in float64 from the
checkpoint files: whole-model norms sqrt(sum_t ||x_i,t||^2), per-layer norms
over the tensors of one output layer, per-tensor norms outside the layers.
"merge equals freeze + stock" runs the stock ``mergekit-yaml`` on the recipe
that ``mergekit-nan freeze`` wrote.
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
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import get
from support import load_model_tensors, nan_alphas, run_mergekit_yaml, tensors_of

from mergekit_nan.commands.card import FROZEN_FILE
from mergekit_nan.commands.cli import main
from mergekit_nan.commands.tiny import write_model
from mergekit_nan.errors import RecipeError
from mergekit_nan.granularity import recipe_granularity, resolve_granularity

LAYERS = 2


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_recipe(path: Path, recipe: Dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def merge(recipe: Path, out: Path, *extra) -> None:
    result = invoke("merge", recipe, out, "-q", "--no-copy-tokenizer", *extra)
    assert result.exit_code == 0, result.output


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


def nan_recipe(family, *, base: bool, **parameters) -> Dict:
    recipe: Dict = {"merge_method": "nan"}
    if base:
        recipe["base_model"] = str(family[0])
    recipe["models"] = [
        {"model": str(family[1]), "parameters": {"weight": 2.0}},
        {"model": str(family[2])},
        {"model": str(family[3])},
    ]
    if parameters:
        recipe["parameters"] = parameters
    return recipe


PRIORS = [2.0, 1.0, 1.0]


# -- merge against float64 --------------------------------------------------------------------


def test_model_granularity_with_base_delta_priors_lambda(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family, base=True, **{"lambda": 0.8}))
    merge(recipe, tmp_path / "out", "--granularity", "model")
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
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family, base=False))
    merge(recipe, tmp_path / "out", "--granularity", granularity)
    norms = pooled_norms(task_vectors(family[1:], None), granularity)
    assert_merged(tmp_path / "out", expected_nan(family[1:], None, norms, PRIORS))


def test_layer_granularity_with_base_from_the_recipe(family, tmp_path):
    recipe = nan_recipe(family, base=True, nan_granularity="layer", **{"lambda": 1.5})
    path = write_recipe(tmp_path / "r.yml", recipe)
    merge(path, tmp_path / "out")
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
    result = invoke("inspect", path, "-q", "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c.json").read_text())["granularity"] == "layer"


def test_layer_granularity_weights_norm_with_base(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", nan_recipe(family, base=True, nan_norm="weights", nan_exponent=2.0)
    )
    merge(recipe, tmp_path / "out", "--granularity", "layer")
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
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family, base=True))
    result = invoke(
        "inspect", recipe, "-q", "--granularity", "layer", "--json", tmp_path / "c.json"
    )
    assert result.exit_code == 0, result.output
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


# -- merge == freeze + stock mergekit-yaml -----------------------------------------------------


def composite_recipe(family, method: str) -> Dict:
    recipe = {
        "merge_method": method,
        "base_model": str(family[0]),
        "parameters": {"density": 0.6},
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family[1:]],
    }
    if method == "nan":
        recipe = nan_recipe(family, base=True, **{"lambda": 0.9})
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
    merge(
        recipe,
        tmp_path / "merged",
        "--granularity",
        granularity,
        "--save-frozen",
        tmp_path / "saved.yml",
        *seed,
    )
    frozen_path = tmp_path / "frozen.yml"
    result = invoke("freeze", recipe, "-o", frozen_path, "-q", "--granularity", granularity)
    assert result.exit_code == 0, result.output
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
    merge(path, tmp_path / "merged", "--granularity", "tensor", "--random-seed", "3")
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
    recipe = nan_recipe(family, base=True, nan_granularity=granularity)
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


def assert_clean_failure(result, out: Path, *words: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


def test_misplaced_granularity_fails_before_writing(family, tmp_path):
    recipe = nan_recipe(family, base=True)
    recipe["models"][1]["parameters"] = {"nan_granularity": "layer"}
    path = write_recipe(tmp_path / "r.yml", recipe)
    out = tmp_path / "out"
    result = invoke("merge", path, out, "-q", "--no-copy-tokenizer")
    assert_clean_failure(result, out, "nan_granularity", "models[1]", "top-level")


def test_failed_norm_pass_writes_nothing(family, tmp_path):
    state = {k: v.float().clone() for k, v in tensors_of(family[2]).items()}
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    broken = write_model(tmp_path / "broken", state)
    recipe = nan_recipe(family, base=True)
    recipe["models"][1]["model"] = str(broken)
    path = write_recipe(tmp_path / "r.yml", recipe)
    out, frozen = tmp_path / "out", tmp_path / "frozen.yml"
    result = invoke("merge", path, out, "-q", "--granularity", "layer", "--save-frozen", frozen)
    assert_clean_failure(result, out, "model.layers.1.mlp.down_proj.weight", str(broken))
    assert not frozen.exists()


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
    merge(path, tmp_path / "out", "--granularity", "layer")
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
    merge(path, tmp_path / "merged", "--granularity", "model")
    result = invoke("freeze", path, "-o", tmp_path / "frozen.yml", "-q", "--granularity", "model")
    assert result.exit_code == 0, result.output
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
    from mergekit_nan.commands.inspect import _CoefficientTask
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
    from mergekit_nan.commands.inspect import _CoefficientTask

    merge, (base, a, b) = adapter_task("ties+nan")
    task = _CoefficientTask(merge=merge)
    values = {m: torch.full((3,), float(i)) for i, m in enumerate((base, a, b))}
    assert task.execute(tensors={base: values[base]}) is None
    weighting = task.execute(tensors=values)
    assert weighting.weights == pytest.approx(nan_alphas([1.0 * 3**0.5, 2.0 * 3**0.5], [1, 1]))
