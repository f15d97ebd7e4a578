"""A LoRA adapter as a merge input (``model+lora``): the LoRA-merging setting of the paper.

mergekit folds the adapter into its base model (W + B @ A * alpha / r) before merging.
The expected output is computed here from the saved adapter tensors, in float64, and
fed to the stock method with independently computed NAN weights.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from safetensors.torch import load_file
from support import load_model_tensors, nan_weights, run_mergekit_yaml

RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def adapter(family, tmp_path_factory):
    """A PEFT LoRA adapter on the family's base model, with non-zero random B."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family[0])
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
    )
    generator = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    path = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(path)
    return path


def folded(base: dict, adapter_path) -> dict:
    """base with W + B @ A * alpha / r on every adapted tensor, in float64."""
    saved = load_file(adapter_path / "adapter_model.safetensors")
    result = {name: tensor.double() for name, tensor in base.items()}
    adapted = 0
    for key, a in saved.items():
        if ".lora_A." not in key:
            continue
        b = saved[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        result[name] = result[name] + (b.double() @ a.double()) * (ALPHA / RANK)
        adapted += 1
    assert adapted == 2 * len(TARGETS)  # two layers in the tiny model
    return result


def test_mergekit_yaml_ties_nan_with_a_lora_input(family, adapter, tmp_path, record_property):
    base_path, ft0, *_ = family
    out = tmp_path / "merged"
    run_mergekit_yaml(
        {
            "merge_method": "ties+nan",
            "base_model": str(base_path),
            "models": [
                {"model": str(ft0), "parameters": {"weight": 1.0, "density": 0.7}},
                {"model": f"{base_path}+{adapter}", "parameters": {"weight": 1.0, "density": 0.7}},
            ],
            "dtype": "float32",
        },
        out,
        "--lora-merge-cache",
        str(tmp_path / "lora_cache"),
    )
    merged = load_model_tensors(out)
    base = load_model_tensors(base_path)
    tuned = load_model_tensors(ft0)
    with_lora = folded(base, adapter)
    assert set(merged) == set(base)

    errors = {}
    for name, tensor in merged.items():
        inputs = [tuned[name], with_lora[name].float()]
        weights = nan_weights(inputs, base[name], total=2.0)
        if not any(target in name for target in TARGETS):
            # the adapter leaves this tensor alone: a zero task vector gets no say
            assert weights[1] == 0.0
        expected = merge_tensors(
            [base[name], *inputs],
            "ties",
            base_index=0,
            parameters={"weight": weights, "density": 0.7},
        )
        errors[name] = float((tensor - expected).abs().max() / expected.abs().max())
    error = max(errors.values())
    record_property("max_relative_error", error)
    print(f"\n  max relative error, mergekit-yaml ties+nan with a LoRA input: {error:.2e}")
    assert error < 2e-6, max(errors, key=errors.get)
    adapted = [n for n in merged if any(t in n for t in TARGETS)]
    assert adapted and all(not torch.equal(merged[n], tuned[n]) for n in adapted)
