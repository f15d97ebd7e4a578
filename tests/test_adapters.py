"""Adapter recipes: LoRA adapters in, one LoRA adapter out (``mergekit-nan merge``).

Three PEFT adapters on the family's base model (``conftest.adapters``), with different
ranks, alphas, targets (one with rsLoRA, one with a trained ``lm_head`` and a zero
update), all with non-zero B. The merged adapter, applied to the base with PEFT's
``merge_and_unload``, is compared with the stock ``mergekit-yaml`` over
``base+adapter`` models (mergekit's own LoRA path) and with a float64
computation here from the dense updates. The refusals are in test_adapter_refusals.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import (
    build_recipe,
    load_model_tensors,
    nan_alphas,
    run_command,
    run_mergekit_yaml,
    write_recipe,
)

from mergekit_nan.lora import concatenate, factor_norm, factor_sum, truncate

peft = pytest.importorskip("peft")


def dense_updates(base: Dict[str, torch.Tensor], adapter: Path) -> Dict[str, torch.Tensor]:
    """Every base tensor's update by ``adapter`` in float64 (zero where it does nothing)."""
    settings = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = settings["r"], settings["lora_alpha"]
    scale = alpha / (math.sqrt(r) if settings["use_rslora"] else r)
    saved = load_file(adapter / "adapter_model.safetensors")
    updates = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in base.items()}
    for key, tensor in saved.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in key:
            b = saved[key.replace(".lora_A.", ".lora_B.")].double()
            updates[name.replace(".lora_A.weight", ".weight")] += scale * (b @ tensor.double())
        elif ".lora_B." not in key:
            updates[name] += tensor.double() - base[name].double()
    return updates


def nan_expected(base, updates, *, priors=None, lam=1.0, total=None, pooled=None):
    """base + sum c_i delta_i with NAN's c_i, in float64 (``pooled``: name -> norms)."""
    result = {}
    for name, tensor in base.items():
        deltas = [u[name] for u in updates]
        norms = pooled[name] if pooled else [float(d.norm()) for d in deltas]
        shares = nan_alphas(norms, priors)  # every delta zero: the base
        scale = lam if total is None else lam * total
        merged = tensor.double() + sum(scale * s * d for s, d in zip(shares, deltas))
        result[name] = merged
    return result


def applied(base_path: Path, adapter_out: Path) -> Dict[str, torch.Tensor]:
    """The base model with the merged adapter folded in by PEFT."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_path)
    merged = peft.PeftModel.from_pretrained(model, adapter_out).merge_and_unload()
    return {name: t.detach() for name, t in merged.state_dict().items()}


def relative(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    return max(
        float((got[n].double() - want[n].double()).abs().max() / want[n].double().abs().max())
        for n in want
    )


def stock_recipe(recipe: dict) -> dict:
    """The same recipe over BASE+ADAPTER models."""
    stock = json.loads(json.dumps(recipe))
    for model in stock["models"]:
        model["model"] = f"{recipe['base_model']}+{model['model']}"
    return stock


# --- the factor arithmetic, against dense float64 ---------------------------------------------


def test_gram_norms_and_sums_equal_dense_ones():
    generator = torch.Generator().manual_seed(3)
    for m, r, n in ((7, 3, 5), (40, 16, 24), (5, 6, 4)):
        b = torch.randn(m, r, generator=generator, dtype=torch.float64)
        a = torch.randn(r, n, generator=generator, dtype=torch.float64)
        dense = 0.7 * (b @ a)
        assert math.isclose(factor_norm(b, a, 0.7), float(dense.norm()), rel_tol=1e-12)
        assert math.isclose(factor_sum(b, a, 0.7), float(dense.sum()), rel_tol=1e-10)
    zero = torch.zeros(4, 2, dtype=torch.float64)
    assert factor_norm(zero, torch.ones(2, 3, dtype=torch.float64)) == 0.0


def test_concatenated_factors_are_the_weighted_sum():
    generator = torch.Generator().manual_seed(4)
    terms = [
        (torch.randn(6, r, generator=generator), torch.randn(r, 5, generator=generator), c)
        for r, c in ((2, 0.5), (3, -1.25), (1, 2.0))
    ]
    b, a = concatenate(terms, torch.float64)
    assert b.shape == (6, 6) and a.shape == (6, 5)
    want = sum(c * bi.double() @ ai.double() for bi, ai, c in terms)
    assert torch.allclose(b @ a, want, rtol=0, atol=1e-12)


def test_truncation_is_the_dense_best_approximation():
    generator = torch.Generator().manual_seed(5)
    b = torch.randn(30, 9, generator=generator, dtype=torch.float64)
    a = torch.randn(9, 20, generator=generator, dtype=torch.float64)
    dense = b @ a
    u, s, vh = torch.linalg.svd(dense)
    for rank in (1, 4, 8):
        cut = truncate(b, a, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert cut.b.shape == (30, rank) and cut.a.shape == (rank, 20)
        assert torch.allclose(cut.b @ cut.a, best, rtol=0, atol=1e-10)
        kept = math.sqrt(float(s[:rank].square().sum() / s.square().sum()))
        assert math.isclose(cut.retained, kept, rel_tol=1e-12)
        error = float((dense - best).norm() / dense.norm())
        assert math.isclose(cut.error, error, rel_tol=1e-9)
    assert truncate(b, a, 9).retained == 1.0


# --- merges -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(family, adapters):
    base = load_model_tensors(family[0])
    return base, [dense_updates(base, adapter) for adapter in adapters]


@pytest.mark.parametrize(
    "method, parameters, weights",
    [
        ("nan", {"lambda": 1.5}, [1.0, 2.0, 1.0]),
        ("task_arithmetic+nan", {"normalize": False}, [0.5, 0.5, 1.0]),
        ("task_arithmetic", {"normalize": True, "lambda": 0.8}, [1.0, 2.0, 0.5]),
    ],
)
def test_adapter_merge_equals_the_stock_merge_of_base_plus_adapter(
    family, adapters, dense, tmp_path, method, parameters, weights, record_property
):
    recipe = build_recipe(adapters, method, base=family[0], parameters=parameters, weights=weights)
    out = tmp_path / "merged-adapter"
    result = run_command(
        "mergekit-nan", "merge", write_recipe(tmp_path / "recipe.yml", recipe), out
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "mergekit_config.yml",
    ]
    assert "mergekit-nan merge mergekit_config.yml OUT_PATH" in (out / "README.md").read_text()
    got = applied(family[0], out)

    stock_out = tmp_path / "stock"
    run_mergekit_yaml(
        stock_recipe(recipe), stock_out, "--lora-merge-cache", str(tmp_path / "lora-cache")
    )
    stock = load_model_tensors(stock_out)
    assert set(got) == set(stock)
    error = relative(got, stock)
    record_property("relative_error_vs_stock", error)
    assert error <= 1e-6

    base, updates = dense
    if method == "nan":
        want = nan_expected(base, updates, priors=weights, lam=1.5)
    elif method == "task_arithmetic+nan":
        want = nan_expected(base, updates, total=sum(weights))
    else:  # no NAN: the given weights, normalised
        want = {
            name: tensor.double()
            + 0.8 * sum(w * u[name] for w, u in zip(weights, updates)) / sum(weights)
            for name, tensor in base.items()
        }
    assert relative(got, want) <= 1e-6
    # every adapter changed the merged model where it acted, and lm_head is merged fully
    assert not torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(
        got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )


def test_rank_sums_and_zero_updates_add_no_rank(family, adapters, tmp_path):
    out = tmp_path / "merged"
    result = run_command(
        "mergekit-nan",
        "merge",
        write_recipe(tmp_path / "r.yml", build_recipe(adapters, base=family[0])),
        out,
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "adapter_config.json").read_text())
    saved = load_file(out / "adapter_model.safetensors")
    rank = {k: v.shape[0] for k, v in saved.items() if ".lora_A." in k}
    prefix = "base_model.model.model.layers."
    assert rank[prefix + "0.self_attn.q_proj.lora_A.weight"] == 4 + 2 + 8
    assert rank[prefix + "1.self_attn.v_proj.lora_A.weight"] == 4  # ad2's update is zero
    assert rank[prefix + "0.mlp.down_proj.lora_A.weight"] == 2
    assert settings["modules_to_save"] == ["lm_head"]
    assert "base_model.model.lm_head.weight" in saved
    assert f"{len(rank)} modules" in result.stdout


@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_pooled_granularity_equals_the_full_model_merge(
    family, adapters, dense, tmp_path, granularity
):
    recipe = build_recipe(adapters, "nan", base=family[0])
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    out = tmp_path / "adapter"
    assert (
        run_command("mergekit-nan", "merge", path, out, "--granularity", granularity).returncode
        == 0
    )
    full = tmp_path / "full"
    result = run_command(
        "mergekit-nan",
        "merge",
        path,
        full,
        "--granularity",
        granularity,
        "--full-model",
        "--no-copy-tokenizer",
    )
    assert result.returncode == 0, result.stderr
    got, stock = applied(family[0], out), load_model_tensors(full)
    assert relative(got, stock) <= 1e-6

    base, updates = dense
    groups: Dict[object, List[float]] = {}
    key = {}
    for name in base:
        layer = name.split(".")[2] if name.startswith("model.layers.") else name
        key[name] = layer if granularity == "layer" else None
        squares = groups.setdefault(key[name], [0.0] * len(updates))
        for index, update in enumerate(updates):
            squares[index] += float(update[name].square().sum())
    pooled = {name: [math.sqrt(v) for v in groups[key[name]]] for name in base}
    want = nan_expected(base, updates, pooled=pooled)
    assert relative(got, want) <= 1e-6


def test_rank_cut_reports_what_a_dense_svd_keeps(family, adapters, dense, tmp_path):
    path = write_recipe(tmp_path / "recipe.yml", build_recipe(adapters, base=family[0]))
    out = tmp_path / "cut"
    result = run_command("mergekit-nan", "merge", path, out, "--rank", "3")
    assert result.returncode == 0, result.stderr
    card = (out / "README.md").read_text()
    reported = {}
    for line in card.splitlines():
        if line.startswith("| model."):
            module, value = (cell.strip() for cell in line.strip("|").split("|"))
            reported[module] = float(value)
    base, updates = dense
    merged = nan_expected(base, updates)
    saved = load_file(out / "adapter_model.safetensors")
    assert reported and all(
        saved[f"base_model.model.{m}.lora_A.weight"].shape[0] <= 3 for m in reported
    )
    worst = min(reported, key=reported.get)
    for module, value in reported.items():
        delta = merged[module + ".weight"] - base[module + ".weight"].double()
        s = torch.linalg.svdvals(delta)
        kept = math.sqrt(float(s[:3].square().sum() / s.square().sum()))
        assert abs(value - kept) <= 1e-5, module
        a = saved[f"base_model.model.{module}.lora_A.weight"].double()
        b = saved[f"base_model.model.{module}.lora_B.weight"].double()
        u, _, vh = torch.linalg.svd(delta)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert float((b @ a - best).norm() / delta.norm()) <= 1e-5
    assert f"worst {worst} keeps {reported[worst]:.4f}" in result.stdout


def test_inspect_and_freeze_read_adapter_recipes(family, adapters, dense, tmp_path):
    recipe = build_recipe(adapters, "task_arithmetic+nan", base=family[0], weights=[1.0, 1.0, 1.0])
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    report = tmp_path / "c.json"
    result = run_command("mergekit-nan", "inspect", str(path), "--json", str(report))
    assert result.returncode == 0, result.stderr
    base, updates = dense
    rows = {t["name"]: t for t in json.loads(report.read_text())["tensors"]}
    name = "model.layers.0.self_attn.q_proj.weight"
    norms = [float(u[name].norm()) for u in updates]
    weights = [3 * a for a in nan_alphas(norms)]
    for model, norm, weight in zip(rows[name]["models"], norms, weights):
        assert math.isclose(model["norm"], norm, rel_tol=1e-6)
        assert math.isclose(model["weight"], weight, rel_tol=1e-6)

    frozen = tmp_path / "frozen.yml"
    result = run_command(
        "mergekit-nan", "freeze", str(path), "-o", str(frozen), "--granularity", "layer"
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(frozen.read_text())
    assert data["merge_method"] == "task_arithmetic"
    sources = data["slices"][0]["sources"]
    assert all("+" in s["model"] for s in sources if s["model"] != str(family[0]))
    stock_out = tmp_path / "stock"
    run_mergekit_yaml(data, stock_out, "--lora-merge-cache", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    saved = tmp_path / "saved.yml"
    assert (
        run_command(
            "mergekit-nan",
            "merge",
            path,
            out,
            "--granularity",
            "layer",
            "--save-frozen",
            str(saved),
        ).returncode
        == 0
    )
    assert relative(applied(family[0], out), load_model_tensors(stock_out)) <= 1e-6
    assert yaml.safe_load(saved.read_text()) == data


@pytest.fixture(scope="module")
def inspected_both(family, adapters, tmp_path_factory):
    """``inspect(recipe)``: the adapter path's inspection and the full-model one over
    ``base+adapter`` models (mergekit merges the adapters into a shared cache)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_nan.commands.adapters.coefficients import (
        adapter_inspection,
        base_adapter_config,
    )
    from mergekit_nan.commands.inspection.coefficient_pass import inspect_recipe
    from mergekit_nan.doctor.adapters import adapter_recipe as read_adapter_recipe

    options = MergeOptions(lora_merge_cache=str(tmp_path_factory.mktemp("lora")), quiet=True)

    def inspect(recipe: dict):
        config = MergeConfiguration.model_validate(recipe)
        adapters_read = read_adapter_recipe(config)
        own = adapter_inspection(config, adapters_read, "tensor")
        full = inspect_recipe(base_adapter_config(config, adapters_read), options=options)
        return own, {row.name: row for row in full.tensors}

    return inspect


def test_one_coefficient_rule_for_adapters_and_full_models(
    family, adapters, inspected_both, monkeypatch
):
    """Swap the core's rule for alpha_i ~ ||x_i|| (not its inverse): the adapter path
    follows as the full-model inspection does, so it has no rule of its own."""
    from mergekit_nan import weighting

    rule = weighting.coefficients_from_norms

    def proportional(norms, *, exponent=1.0, prior=None):
        return rule(norms, exponent=-exponent, prior=prior)

    monkeypatch.setattr(weighting, "coefficients_from_norms", proportional)
    recipe = build_recipe(adapters, "task_arithmetic+nan", base=family[0], weights=[1.0, 0.5, 0.5])
    own, full = inspected_both(recipe)
    assert own.tensors
    for row in own.tensors:
        # The adapter path reads in float64, the full-model one in float32.
        for found, precision in ((row, 1e-12), (full[row.name], 1e-6)):
            total = math.fsum(found.norms)
            want = [2 * n / total for n in found.norms]
            assert found.weights == pytest.approx(want, rel=precision)
        assert row.weights == pytest.approx(full[row.name].weights, rel=1e-4, abs=1e-9)


def test_adapter_parameters_resolve_as_for_full_models(family, adapters, inspected_both):
    """A per-model filter that misses a tensor falls through to the top-level value, as
    mergekit's planner resolves it; bad values get the specs' own messages."""
    from mergekit.config import MergeConfiguration

    from mergekit_nan.commands.adapters.coefficients import adapter_updates
    from mergekit_nan.doctor.adapters import adapter_recipe as read_adapter_recipe
    from mergekit_nan.errors import RecipeError
    from mergekit_nan.method import NanMerge

    recipe = build_recipe(
        adapters, "nan", base=family[0], parameters={"weight": 3.0}, weights=[1.0, 1.0, 1.0]
    )
    recipe["models"][0]["parameters"] = {"weight": [{"filter": "q_proj", "value": 2.0}]}
    own, full = inspected_both(recipe)
    for row in own.tensors:
        prior = 2.0 if "q_proj" in row.name else 3.0
        inverse = [w / n if n > 0 else 0.0 for w, n in zip((prior, 1.0, 1.0), row.norms)]
        assert row.shares == pytest.approx([v / sum(inverse) for v in inverse], rel=1e-12)
        assert row.shares == pytest.approx(full[row.name].shares, rel=1e-4, abs=1e-9)

    spec = next(p for p in NanMerge.spec.parameters if p.name == "weight")
    with pytest.raises(RecipeError) as refused:
        spec.validate(-1.0)
    recipe = build_recipe(adapters, "nan", base=family[0], weights=[1.0, -1.0, 1.0])
    config = MergeConfiguration.model_validate(recipe)
    with pytest.raises(RecipeError) as raised:
        adapter_updates(config, read_adapter_recipe(config), "tensor")
    assert raised.value.message == refused.value.message


def test_check_reads_adapter_recipes(family, adapters, tmp_path):
    path = write_recipe(tmp_path / "recipe.yml", build_recipe(adapters, base=family[0]))
    result = run_command("mergekit-nan", "check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 LoRA adapters" in result.stdout
    stock = run_mergekit_yaml(
        yaml.safe_load(path.read_text()), tmp_path / "stock", check=False
    )  # the stock command reads models, not adapters: refused before writing
    assert stock.returncode == 1 and "mergekit-nan merge RECIPE OUT_PATH" in stock.stderr
    assert not (tmp_path / "stock").exists()
    ties = write_recipe(tmp_path / "ties.yml", build_recipe(adapters, "ties+nan", base=family[0]))
    result = run_command("mergekit-nan", "check", str(ties))
    assert "adapter-method" in result.stdout or "cannot merge LoRA adapters" in result.stdout


def test_full_model_merges_a_sparsifying_method_as_mergekit_does(family, adapters, tmp_path):
    recipe = build_recipe(adapters, "ties+nan", base=family[0])
    for model in recipe["models"]:
        model["parameters"] = {"density": 0.6}
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    out = tmp_path / "full"
    result = run_command("mergekit-nan", "merge", path, out, "--full-model", "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    assert (out / "README.md").is_file() and not (out / "adapter_config.json").exists()
    stock_out = tmp_path / "stock"
    run_mergekit_yaml(stock_recipe(recipe), stock_out, "--lora-merge-cache", str(tmp_path / "c"))
    got, stock = load_model_tensors(out), load_model_tensors(stock_out)
    assert set(got) == set(stock)
    assert all(torch.equal(got[name], stock[name]) for name in stock)
