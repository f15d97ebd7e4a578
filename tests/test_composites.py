"""``<method>+nan``: equal to the stock method given independently computed NAN weights."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import load_model_tensors, run_mergekit_yaml
from mergekit.merge_methods import get, merge_tensors

from mergekit_nan import nan_coefficients

ERRORS: dict = {}


def nan_weights(tensors, base=None, total=1.0):
    """float64 inverse-norm ratios times ``total``, written out independently."""
    xs = [t.double() - base.double() if base is not None else t.double() for t in tensors]
    inv = [1 / math.sqrt(float((x * x).sum())) for x in xs]
    return [total * w / sum(inv) for w in inv]


def sample(seed, shape=(64, 32), scales=(0.01, 0.03, 0.06)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + s * torch.randn(shape, generator=generator) for s in scales]


CASES = [
    ("linear", {}),
    ("linear", {"weight": [1.0, 1.0, 1.0]}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weight": [1.0, 1.0, 1.0], "lambda": 0.8}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "weight": [0.5, 0.3, 0.2], "int8_mask": True}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.6, "epsilon": 0.1, "lambda": 1.1}),
    ("dare_ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.7, "weight": [2.0, 1.0, 1.0]}),
]


@pytest.mark.parametrize("method, params", CASES)
def test_composite_equals_stock_with_nan_weights(method, params):
    base, tuned = sample(len(ERRORS))
    with_base = method != "linear"
    inputs = [base, *tuned] if with_base else tuned
    base_index = 0 if with_base else None
    total = sum(params["weight"]) if "weight" in params else 1.0
    stock_params = {
        **params,
        "weight": nan_weights(tuned, base if with_base else None, total),
    }
    torch.manual_seed(1234)
    expected = merge_tensors(inputs, method, base_index=base_index, parameters=stock_params)
    torch.manual_seed(1234)
    actual = merge_tensors(inputs, f"{method}+nan", base_index=base_index, parameters=params)
    error = float((actual - expected).abs().max() / expected.abs().max())
    ERRORS[f"{method} {sorted(params)}"] = error
    assert error < 1e-6, error


def test_random_methods_draw_like_the_stock_method():
    """Same seed, same DARE mask: the kept entries coincide exactly."""
    base, tuned = sample(99)
    torch.manual_seed(7)
    stock = merge_tensors(
        [base, *tuned],
        "dare_linear",
        base_index=0,
        parameters={"density": 0.3, "weight": [1.0, 1.0, 1.0], "rescale": False},
    )
    torch.manual_seed(7)
    composite = merge_tensors(
        [base, *tuned],
        "dare_linear+nan",
        base_index=0,
        parameters={"density": 0.3, "rescale": False},
    )
    assert torch.equal(stock == base, composite == base)


def test_partial_weights_are_refused_with_names():
    base, tuned = sample(5)
    with pytest.raises(ValueError, match=r"'blk\.w' has a weight for some models but not for b"):
        merge_tensors(
            [base, *tuned[:2]],
            "task_arithmetic+nan",
            base_index=0,
            ids=["base", "a", "b"],
            name="blk.w",
            parameters={"weight": {"a": 1.0, "b": None}},
        )


def test_linear_has_no_delta_reading():
    _, tuned = sample(6)
    with pytest.raises(ValueError, match=r"linear ignores the base model.*'w'"):
        merge_tensors(tuned, "linear+nan", parameters={"nan_norm": "delta"}, name="w")


def test_wrapping_checks_the_inner_method():
    with pytest.raises(ValueError, match="'slerp' has no per-model weight"):
        nan_coefficients(get("slerp"))
    with pytest.raises(ValueError, match="already uses NAN"):
        nan_coefficients(get("ties+nan"))
    spec = nan_coefficients(get("della")).spec
    stock = get("della").spec
    assert spec.name == "della+nan" and spec.contract == stock.contract
    assert {p.name for p in spec.parameters} == {p.name for p in stock.parameters} | {
        "nan_exponent",
        "nan_norm",
    }
    assert next(p for p in spec.parameters if p.name == "weight").default is None


# --- through the stock mergekit-yaml ------------------------------------------------------


def frozen_weights(inputs, base, totals):
    """Per-tensor weights as mergekit filter lists, computed independently of the plugin."""
    loaded = [load_model_tensors(p) for p in inputs]
    base_tensors = load_model_tensors(base)
    names = sorted(base_tensors)
    lists = [[] for _ in inputs]
    for name in names:
        weights = nan_weights([m[name] for m in loaded], base_tensors[name], totals(name))
        for column, value in zip(lists, weights):
            column.append({"filter": name, "value": value})
    # full tensor names must not be substrings of one another, or filters would clash
    assert not [a for a in names for b in names if a != b and a in b]
    return lists


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_mergekit_yaml_slices_filters_gradient(method, family, tmp_path):
    base, *tuned = family
    density = [
        {"filter": "self_attn", "value": 0.4},
        {"filter": "mlp", "value": 0.8},
        {"value": 0.6},
    ]
    gradient = [1.0, 0.5]  # on the second model's weight, over the layers of the slice

    def recipe(name, weights):
        return {
            "merge_method": name,
            "base_model": str(base),
            "slices": [
                {
                    "sources": [
                        {"model": str(p), "layer_range": [0, 2], "parameters": {"weight": w}}
                        for p, w in zip([base, *tuned], [None, *weights])
                    ]
                }
            ],
            "parameters": {"density": density},
            "dtype": "float32",
        }

    composite = recipe(f"{method}+nan", [1.0, gradient, 1.0])
    for source in composite["slices"][0]["sources"][:1]:
        source.pop("parameters")
    out_nan = tmp_path / "nan"
    run_mergekit_yaml(composite, out_nan, "--random-seed", "17")

    # t is 0 outside the layers and for layer 0, 1 for layer 1 (two-layer slice)
    def totals(name):
        return 2.0 + (gradient[1] if "layers.1." in name else gradient[0])

    stock = recipe(method, frozen_weights(tuned, base, totals))
    stock["slices"][0]["sources"][0].pop("parameters")
    out_stock = tmp_path / "stock"
    run_mergekit_yaml(stock, out_stock, "--random-seed", "17")
    assert "+nan" not in yaml.safe_dump(stock)

    merged, expected = load_model_tensors(out_nan), load_model_tensors(out_stock)
    assert set(merged) == set(expected)
    error = max(
        float((merged[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in merged
    )
    ERRORS[f"mergekit-yaml {method}+nan"] = error
    assert error < 1e-5, error


def test_mergekit_yaml_lora_reference(family, tmp_path):
    """A PEFT LoRA adapter as one input (model+lora), the paper's LoRA-merging path."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base, ft0, *_ = family
    model = LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in lora_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapter = tmp_path / "adapter"
    lora_model.save_pretrained(adapter)
    merged_lora = {
        f"{k}": v.detach().clone() for k, v in lora_model.merge_and_unload().state_dict().items()
    }

    out = tmp_path / "merged"
    run_mergekit_yaml(
        {
            "merge_method": "task_arithmetic+nan",
            "base_model": str(base),
            "models": [{"model": str(ft0)}, {"model": f"{base}+{adapter}"}],
            "dtype": "float32",
        },
        out,
        "--lora-merge-cache",
        str(tmp_path / "lora_cache"),
    )
    result = load_model_tensors(out)
    base_tensors, ft0_tensors = load_model_tensors(base), load_model_tensors(ft0)
    worst = 0.0
    for name, tensor in result.items():
        b = base_tensors[name].double()
        deltas = [ft0_tensors[name].double() - b, merged_lora[name].double() - b]
        norms = [math.sqrt(float((d * d).sum())) for d in deltas]
        scores = [1 / n if n > 0 else 0.0 for n in norms]
        expected = b + sum(s / sum(scores) * d for s, d in zip(scores, deltas))
        worst = max(worst, float((tensor.double() - expected).abs().max() / expected.abs().max()))
        if "q_proj" not in name and "v_proj" not in name:
            # the adapter leaves this tensor alone: zero task vector, no say
            assert torch.allclose(tensor, ft0_tensors[name], rtol=0, atol=1e-7)
    ERRORS["mergekit-yaml task_arithmetic+nan with LoRA"] = worst
    assert worst < 1e-5, worst


def test_unknown_composite_fails_in_mergekit_yaml(family, tmp_path):
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
    assert "'slerp' declares no per-model weight" in result.stderr
    assert "ties+nan" in result.stderr and "dare_ties+nan" in result.stderr
    assert not out.exists()


def test_report_errors(capsys):
    """Prints the max relative error of each equivalence test run before it (-s to see)."""
    with capsys.disabled():
        for name, value in ERRORS.items():
            print(f"  max rel error {name}: {value:.2e}")
