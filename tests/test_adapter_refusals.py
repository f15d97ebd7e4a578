"""Adapter recipes that an adapter merge refuses: each names the problem and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import (
    build_recipe,
    run_command,
    write_lora_adapter,
    write_recipe,
)

peft = pytest.importorskip("peft")


# --- refusals -----------------------------------------------------------------------------------


def _edited(adapter: Path, where: Path, settings=None, tensors=None) -> Path:
    shutil.copytree(adapter, where)
    if settings:
        data = json.loads((where / "adapter_config.json").read_text())
        data.update(settings)
        (where / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        saved = load_file(where / "adapter_model.safetensors")
        saved.update(tensors)
        save_file(saved, where / "adapter_model.safetensors")
    return where


@pytest.fixture(scope="module")
def broken(family, adapters, tmp_path_factory):
    """Adapters (and recipe changes) that an adapter merge refuses, with the words it says."""
    root = tmp_path_factory.mktemp("broken")
    good = adapters[0]
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    dora = write_lora_adapter(
        family[0],
        root / "dora",
        7,
        r=2,
        lora_alpha=2,
        target_modules=["q_proj"],
        use_dora=True,
        b_scale=0.01,
    )
    bias = write_lora_adapter(
        family[0],
        root / "bias",
        8,
        r=2,
        lora_alpha=2,
        target_modules=["q_proj"],
        bias="all",
        b_scale=0.01,
    )
    other = _edited(good, root / "other", {"base_model_name_or_path": str(family[1])})
    shape = _edited(good, root / "shape", tensors={q + ".lora_B.weight": torch.ones(32, 3)})
    corrupt = _edited(good, root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return {
        "dora": ([dora], {}, ["dora", "DoRA", "lora_magnitude_vector"]),
        "bias": ([bias], {}, ["bias", "trains biases"]),
        "other-base": ([other], {}, ["other", "was trained on", str(family[1])]),
        "shape": ([shape], {}, ["shape", "model.layers.0.self_attn.q_proj", "do not"]),
        "ties": ([], {"merge_method": "ties+nan"}, ["ties+nan", "--full-model"]),
        "linear": ([], {"merge_method": "linear+nan"}, ["linear ignores base_model"]),
        "norm": ([], {"parameters": {"nan_norm": "weights"}}, ["nan_norm: weights"]),
        "mixed": ([family[1]], {}, ["mixes LoRA adapters", str(family[1])]),
        "corrupt": ([corrupt], {}, ["corrupt", "cannot read adapter_model.safetensors"]),
        "gradient": ([], {"parameters": {"lambda": [1.0, 2.0]}}, ["lambda is a gradient"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dora",
        "bias",
        "other-base",
        "shape",
        "ties",
        "linear",
        "norm",
        "mixed",
        "corrupt",
        "gradient",
    ],
)
def test_refusals_name_the_problem_and_write_nothing(family, adapters, broken, tmp_path, case):
    extra, changes, words = broken[case]
    recipe = build_recipe(adapters[:2] + extra, base=family[0])
    recipe.update(changes)
    out = tmp_path / "out"
    result = run_command(
        "mergekit-nan", "merge", write_recipe(tmp_path / "recipe.yml", recipe), out
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


def test_output_over_an_adapter_is_refused(family, adapters, tmp_path):
    copy = shutil.copytree(adapters[0], tmp_path / "copy")
    before = sorted((p.name, p.stat().st_size) for p in copy.iterdir())
    recipe = build_recipe([copy, adapters[1]], base=family[0])
    result = run_command(
        "mergekit-nan", "merge", write_recipe(tmp_path / "recipe.yml", recipe), copy, "--overwrite"
    )
    assert result.returncode == 1
    assert "output-overwrites-input" in result.stderr or "overwrite" in result.stderr
    assert sorted((p.name, p.stat().st_size) for p in copy.iterdir()) == before


def test_rank_needs_an_adapter_recipe(family, tmp_path):
    recipe = {
        "merge_method": "nan",
        "base_model": str(family[0]),
        "models": [{"model": str(family[1])}, {"model": str(family[2])}],
    }
    out = tmp_path / "out"
    result = run_command(
        "mergekit-nan", "merge", write_recipe(tmp_path / "recipe.yml", recipe), out, "--rank", "2"
    )
    assert result.returncode == 1 and "apply to adapter recipes" in result.stderr
    assert not out.exists()
