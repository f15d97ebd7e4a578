"""The ``nan`` merge method: in-memory API, stock mergekit commands, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors
from support import load_model_tensors, nan_merge, relative_error, run_command, run_mergekit_yaml

import mergekit_nan  # noqa: F401  (registers the methods in this process)
from mergekit_nan.errors import RecipeError


def group(seed=0, shape=(48, 24), scales=(0.01, 0.02, 0.05)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + s * torch.randn(shape, generator=generator) for s in scales]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"nan_exponent": 2.0},
        {"nan_exponent": 0.0},
        {"nan_exponent": -1.0},
        {"lambda": 0.6},
        {"lambda": 1.5, "nan_exponent": 0.5},
        {"weight": [2.0, 1.0, 0.5]},
        {"nan_norm": "weights"},
        {"nan_norm": "delta", "lambda": 0.8},
    ],
)
def test_merge_tensors_with_base(params):
    base, tuned = group(1)
    result = merge_tensors([base, *tuned], "nan", base_index=0, parameters=params)
    expected = nan_merge(
        tuned,
        base,
        exponent=params.get("nan_exponent", 1.0),
        lam=params.get("lambda", 1.0),
        priors=params.get("weight"),
        norm=params.get("nan_norm", "auto"),
    )
    assert result.dtype == torch.float32
    assert relative_error(result, expected) < 1e-6


@pytest.mark.parametrize("params", [{}, {"nan_exponent": 2.0}, {"weight": [1.0, 3.0, 1.0]}])
def test_merge_tensors_without_base(params):
    _, tuned = group(2)
    result = merge_tensors(tuned, "nan", parameters=params)
    expected = nan_merge(
        tuned, exponent=params.get("nan_exponent", 1.0), priors=params.get("weight")
    )
    assert relative_error(result, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_computed_in_float32(dtype):
    base, tuned = group(3, scales=(0.01, 0.03, 0.09))
    inputs = [t.to(dtype) for t in (base, *tuned)]
    result = merge_tensors(inputs, "nan", base_index=0)
    assert result.dtype == dtype
    expected = nan_merge(inputs[1:], inputs[0])
    assert relative_error(result, expected) < 2 * torch.finfo(dtype).eps


def test_float64_inputs_merge_in_float64():
    base, tuned = group(4)
    inputs = [t.double() for t in (base, *tuned)]
    result = merge_tensors(inputs, "nan", base_index=0)
    assert result.dtype == torch.float64
    assert relative_error(result, nan_merge(inputs[1:], inputs[0])) < 1e-13


def test_zero_task_vector_gets_no_weight_and_all_zero_returns_base():
    base, tuned = group(5)
    tuned[0] = base.clone()
    result = merge_tensors([base, *tuned], "nan", base_index=0)
    assert relative_error(result, nan_merge(tuned, base)) < 1e-6
    same = merge_tensors([base, base.clone(), base.clone()], "nan", base_index=0)
    assert torch.equal(same, base)


def test_merge_state_dicts_copies_non_float_buffers():
    base, tuned = group(6)
    steps = torch.arange(5)
    models = {
        name: {"w": tensor, "steps": steps.clone()}
        for name, tensor in zip(["base", "a", "b", "c"], [base, *tuned])
    }
    merged = merge_state_dicts(models, "nan", base="base")
    assert torch.equal(merged["steps"], steps)
    assert relative_error(merged["w"], nan_merge(tuned, base)) < 1e-6


def test_non_finite_input_names_tensor_and_model():
    base, tuned = group(7)
    tuned[1] = tuned[1].clone()
    tuned[1][2, 3] = float("nan")
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' of model\(s\) ft1"
    ):
        merge_tensors(
            [base, *tuned],
            "nan",
            base_index=0,
            ids=["base", "ft0", "ft1", "ft2"],
            name="model.layers.0.mlp.up_proj.weight",
        )
    poisoned = base.clone()
    poisoned[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"base0 \(base\)"):
        merge_tensors(
            [poisoned, *tuned[::2]], "nan", base_index=0, ids=["base0", "x", "y"], name="w"
        )


def test_delta_without_base_is_refused():
    _, tuned = group(8)
    with pytest.raises(
        ValueError, match=r"nan_norm: delta needs a base model.*'lm_head\.weight'.*a, b, c"
    ):
        merge_tensors(
            tuned,
            "nan",
            parameters={"nan_norm": "delta"},
            ids=["a", "b", "c"],
            name="lm_head.weight",
        )


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"nan_norm": "frobenius"}, RecipeError, "^nan_norm must be one of auto, delta, weights"),
        ({"nan_exponent": float("nan")}, RecipeError, "^nan_exponent must be finite"),
        ({"nan_exponent": float("inf")}, RecipeError, "^nan_exponent must be finite"),
        ({"lambda": float("inf")}, RecipeError, "^lambda must be finite"),
        ({"lambda": 1.0e300}, RecipeError, r"^lambda = 1e\+300 overflows float32.*'w'"),
        ({"weight": [1.0, -1.0, 1.0]}, RecipeError, "^weight must be non-negative"),
        ({"weight": [0.0, 0.0, 0.0]}, ValueError, "must be non-negative and not all zero.*'w'"),
    ],
)
def test_invalid_parameters(params, error, message):
    """Each message stands alone: no pydantic wrapper text before it."""
    base, tuned = group(9)
    with pytest.raises(error, match=message) as raised:
        merge_tensors([base, *tuned], "nan", base_index=0, parameters=params, name="w")
    assert "function-after" not in str(raised.value)


def test_single_input_is_refused():
    base, _ = group(10)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        merge_tensors([base], "nan", name="w")


def test_integer_tensors_are_refused_with_names():
    ints = [torch.arange(6), torch.arange(6)]
    with pytest.raises(TypeError, match=r"'position_ids'.*model a"):
        merge_tensors(ints, "nan", ids=["a", "b"], name="position_ids")


def test_extrapolating_lambda_that_overflows_half_precision_is_refused():
    base = torch.zeros(4, 4, dtype=torch.float16)
    tuned = [torch.full((4, 4), 30000.0, dtype=torch.float16)] * 2
    with pytest.raises(OverflowError, match=r"'w'.*float16.*lambda=4.0"):
        merge_tensors([base, *tuned], "nan", base_index=0, parameters={"lambda": 4.0}, name="w")
    # the same inputs within the convex range merge fine
    ok = merge_tensors([base, *tuned], "nan", base_index=0, parameters={"lambda": 1.0})
    assert torch.equal(ok, tuned[0])


# --- the stock commands -------------------------------------------------------------------


def check_model_dir(out: Path, inputs, base=None, **formula):
    """Every tensor of the merged checkpoint against the float64 formula."""
    merged = load_model_tensors(out)
    loaded = [load_model_tensors(p) for p in inputs]
    base_tensors = load_model_tensors(base) if base is not None else None
    assert set(merged) == set(loaded[0])
    worst = 0.0
    for name, tensor in merged.items():
        expected = nan_merge(
            [m[name] for m in loaded], base_tensors[name] if base_tensors else None, **formula
        )
        worst = max(worst, relative_error(tensor, expected))
    assert worst < 1e-6, worst
    return worst


def test_mergekit_yaml_with_base(family, tmp_path):
    base, *tuned = family
    config = {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in tuned],
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    run_mergekit_yaml(config, out)
    check_model_dir(out, tuned, base)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "[NAN](https://arxiv.org/abs/2505.16148)" in card


def test_mergekit_yaml_without_base(family, tmp_path):
    _, *tuned = family
    config = {
        "merge_method": "nan",
        "models": [{"model": str(p)} for p in tuned],
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    run_mergekit_yaml(config, out)
    check_model_dir(out, tuned)


def test_mergekit_yaml_parameters(family, tmp_path):
    base, *tuned = family
    priors = [1.0, 2.0, 0.5]
    config = {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(tuned, priors)],
        "parameters": {"nan_exponent": 2.0, "lambda": 0.7},
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    run_mergekit_yaml(config, out)
    check_model_dir(out, tuned, base, exponent=2.0, lam=0.7, priors=priors)


def test_mergekit_yaml_rejects_bad_parameters_before_writing(family, tmp_path):
    base, *tuned = family
    config = {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in tuned],
        "parameters": {"nan_norm": "frobenius"},
    }
    out = tmp_path / "merged"
    result = run_mergekit_yaml(config, out, check=False)
    assert result.returncode != 0
    assert "nan_norm must be one of auto, delta, weights" in result.stderr
    assert not any(out.glob("*.safetensors"))


def test_mergekit_yaml_delta_without_base_fails_clearly(family, tmp_path):
    _, *tuned = family
    config = {
        "merge_method": "nan",
        "models": [{"model": str(p)} for p in tuned],
        "parameters": {"nan_norm": "delta"},
    }
    out = tmp_path / "merged"
    result = run_mergekit_yaml(config, out, check=False)
    assert result.returncode != 0
    assert "nan_norm: delta needs a base model" in result.stderr
    assert str(tuned[0]) in result.stderr
    assert not (out / "config.json").exists()


def test_mergekit_pytorch_knows_nan(family, tmp_path):
    base, *tuned = family
    config = tmp_path / "raw.yml"
    config.write_text(
        "merge_method: nan\n"
        f"base_model: {base / 'model.safetensors'}\n"
        "models:\n" + "".join(f"  - model: {p / 'model.safetensors'}\n" for p in tuned)
    )
    out = tmp_path / "raw_out"
    run_command("mergekit-pytorch", str(config), str(out), check=True)
    check_model_dir(out, tuned, base)


def test_mergekit_multi_knows_nan(family, tmp_path):
    base, *tuned = family
    config = tmp_path / "multi.yml"
    config.write_text(
        "name: merged\nmerge_method: nan\n"
        f"base_model: {base}\n"
        "dtype: float32\n"
        "models:\n" + "".join(f"  - model: {p}\n" for p in tuned)
    )
    out = tmp_path / "multi_out"
    run_command(
        "mergekit-multi",
        str(config),
        "--intermediate-dir",
        str(out),
        "--no-copy-tokenizer",
        check=True,
    )
    check_model_dir(out / "merged", tuned, base)


@pytest.mark.parametrize("workers", [1, 2], ids=["one worker", "two workers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_weighted_sum_is_the_floats_of_adding_each_term(dtype, workers):
    """The windowed sum writes the floats of zero_() + add_(t, alpha=c), term by term."""
    from mergekit_nan.method import SUM_WINDOW_ELEMENTS, weighted_sum
    from mergekit_nan.norms import PARALLEL_MIN_ELEMENTS, plan_norm_pass

    generator = torch.Generator().manual_seed(3)
    # More than one window and a partial last one; two workers from PARALLEL_MIN_ELEMENTS up.
    rows = (SUM_WINDOW_ELEMENTS if workers == 1 else PARALLEL_MIN_ELEMENTS) // 500 + 7
    shape = (rows, 500)
    plan = plan_norm_pass("cpu", rows * 500, threads=2, chunk=SUM_WINDOW_ELEMENTS)
    assert plan.workers == workers
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    terms = [
        (torch.randn(shape, generator=generator).to(dtype), coefficient)
        for coefficient in (0.37, -1.25, 2.0e-3, 1.0)
    ]
    expected = torch.zeros(shape)
    for tensor, coefficient in terms:
        expected.add_(tensor, alpha=coefficient)
    result = torch.empty(shape)
    try:
        weighted_sum(result, terms)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(result, expected)
    weighted_sum(result, [])
    assert not result.any()
