"""CUDA: the same norms, coefficients and merges as on the CPU.

Marked ``cuda`` and skipped when torch sees no GPU, so CI never needs one.
Norms and coefficients are accumulated in float32 on both devices (only the
order of the additions differs), so they must agree within 1e-6 for float32,
bfloat16 and float16 inputs. Merges through the stock ``mergekit-yaml --cuda``
and ``mergekit-nan inspect --cuda`` must give the CPU results within float32
rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch
from support import family_recipe, load_model_tensors, run_command, run_mergekit_yaml, write_recipe

from mergekit_nan.coefficients import NORM_CHUNK_ELEMENTS, frobenius_norms, tensor_coefficients

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPE = (NORM_CHUNK_ELEMENTS // 601 + 2, 601)
"""More elements than one norm chunk, and not a whole number of norm rows."""


def inputs(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator)
    tuned = [base + s * torch.randn(SHAPE, generator=generator) for s in (0.003, 0.01, 0.04)]
    return base.to(dtype), [t.to(dtype) for t in tuned]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_base", [True, False], ids=["delta", "weights"])
def test_norms_on_cuda_equal_cpu(dtype, with_base):
    base, tuned = inputs(dtype)
    base = base if with_base else None
    cpu = frobenius_norms(tuned, base)
    cuda = frobenius_norms([t.cuda() for t in tuned], None if base is None else base.cuda())
    assert cuda.device.type == "cuda"
    assert cpu.dtype == cuda.dtype == torch.float32
    assert relative_difference(cuda, cpu) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("exponent, prior", [(1.0, None), (2.0, [1.0, 2.0, 0.5])])
def test_coefficients_on_cuda_equal_cpu(dtype, exponent, prior):
    base, tuned = inputs(dtype, seed=1)
    cpu = tensor_coefficients(tuned, base, exponent=exponent, prior=prior)
    cuda = tensor_coefficients(
        [t.cuda() for t in tuned], base.cuda(), exponent=exponent, prior=prior
    )
    assert cuda.device.type == "cuda" and cuda.dtype == cpu.dtype == torch.float32
    assert float((cuda.cpu() - cpu).abs().max()) < 1e-6
    assert float(cuda.sum()) == pytest.approx(1.0, abs=1e-6)


def yaml_recipe(method: str, family: List[Path]) -> dict:
    return family_recipe(family, method, **({} if method == "nan" else {"density": 0.5}))


@pytest.mark.parametrize("method", ["nan", "ties+nan"])
def test_mergekit_yaml_cuda_equals_cpu(method, family, tmp_path):
    recipe = yaml_recipe(method, family)
    run_mergekit_yaml(recipe, tmp_path / "cpu")
    run_mergekit_yaml(recipe, tmp_path / "cuda", "--cuda")
    cpu, cuda = load_model_tensors(tmp_path / "cpu"), load_model_tensors(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for name, tensor in cuda.items():
        expected = cpu[name].double()
        error = float((tensor.double() - expected).abs().max() / expected.abs().max())
        assert error < 2e-6, name


def test_inspect_cuda_equals_cpu(family, tmp_path):
    recipe = tmp_path / "recipe.yml"
    write_recipe(recipe, yaml_recipe("ties+nan", family))
    tables = {}
    for device, flags in (("cpu", []), ("cuda", ["--cuda"])):
        out = tmp_path / f"{device}.json"
        arguments = ["inspect", str(recipe), "-q", "--json", str(out), *flags]
        result = run_command("mergekit-nan", *arguments)
        assert result.returncode == 0, result.stderr
        tables[device] = json.loads(out.read_text())
    cpu, cuda = tables["cpu"]["tensors"], tables["cuda"]["tensors"]
    assert [t["name"] for t in cuda] == [t["name"] for t in cpu]
    for on_cuda, on_cpu in zip(cuda, cpu):
        for model_cuda, model_cpu in zip(on_cuda["models"], on_cpu["models"]):
            assert model_cuda["norm"] == pytest.approx(model_cpu["norm"], rel=1e-6)
            assert model_cuda["weight"] == pytest.approx(model_cpu["weight"], abs=1e-6)


def test_compare_cuda_equals_cpu(family, tmp_path):
    """Merged and scored on the GPU (norms shared between candidates), the CPU's numbers."""
    recipe = tmp_path / "recipe.yml"
    write_recipe(recipe, yaml_recipe("nan", family))
    (tmp_path / "a.txt").write_text("w3 w4 w5 w6 w7\nw8 w9 w10\nw11 w12 w13 w14\n")
    found = {}
    for device, flags in (("cpu", []), ("cuda", ["--cuda"])):
        out = tmp_path / f"{device}.json"
        arguments = ["compare", str(recipe), "--data", str(tmp_path / "a.txt"), "-q",
                     "--exponent", "-1", "--granularity", "layer", "--json", str(out), *flags]  # fmt: skip
        result = run_command("mergekit-nan", *arguments)
        assert result.returncode == 0, result.stderr
        found[device] = json.loads(out.read_text())["candidates"]
    assert [c["label"] for c in found["cuda"]] == [c["label"] for c in found["cpu"]]
    for on_cuda, on_cpu in zip(found["cuda"], found["cpu"]):
        ((file, cpu),) = on_cpu["files"].items()
        cuda = on_cuda["files"][file]
        assert cuda["tokens"] == cpu["tokens"]
        assert cuda["nll"] == pytest.approx(cpu["nll"], rel=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_multi_gpu_merge_and_inspect_equal_cpu(family, tmp_path):
    recipe = tmp_path / "recipe.yml"
    write_recipe(recipe, yaml_recipe("nan", family))
    common = ["--no-copy-tokenizer", "--no-write-model-card"]
    for name, flags in (("cpu", []), ("gpus", ["--multi-gpu", "--cuda"])):
        arguments = ["merge", str(recipe), str(tmp_path / name), *common, *flags]
        result = run_command("mergekit-nan", *arguments)
        assert result.returncode == 0, result.stderr
        out = tmp_path / f"{name}.json"
        arguments = ["inspect", str(recipe), "-q", "--json", str(out), *flags]
        assert run_command("mergekit-nan", *arguments).returncode == 0
    cpu, gpus = load_model_tensors(tmp_path / "cpu"), load_model_tensors(tmp_path / "gpus")
    for name, tensor in gpus.items():
        expected = cpu[name].double()
        assert float((tensor.double() - expected).abs().max() / expected.abs().max()) < 2e-6
    on_cpu = json.loads((tmp_path / "cpu.json").read_text())["tensors"]
    on_gpus = json.loads((tmp_path / "gpus.json").read_text())["tensors"]
    for a, b in zip(on_gpus, on_cpu):
        for model_a, model_b in zip(a["models"], b["models"]):
            assert model_a["norm"] == pytest.approx(model_b["norm"], rel=1e-6)
