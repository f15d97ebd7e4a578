"""The mergekit-nan CLI on tiny checkpoints: clean failures, peak memory and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from support import assert_clean_failure, load_model_tensors, run_command, write_recipe

from mergekit_nan.commands.tiny import tiny_llama_config, write_family

# -- errors: one line, non-zero exit, nothing written ------------------------------------------


def test_recipe_without_nan_method_fails_cleanly(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "ties.yml",
        {
            "merge_method": "ties",
            "base_model": str(family[0]),
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family[1:]],
        },
    )
    out = tmp_path / "frozen.yml"
    result = run_command("mergekit-nan", "freeze", recipe, "-o", out)
    assert_clean_failure(result, out, "'ties'", "ties+nan")


def test_missing_model_fails_cleanly(family, tmp_path):
    missing = tmp_path / "no-such-model"
    recipe = write_recipe(
        tmp_path / "nan.yml",
        {
            "merge_method": "nan",
            "base_model": str(family[0]),
            "models": [{"model": str(family[1])}, {"model": str(missing)}],
        },
    )
    out = tmp_path / "c.json"
    result = run_command("mergekit-nan", "inspect", recipe, "-q", "--json", out)
    assert_clean_failure(result, out, str(missing))


def test_mismatched_shapes_fail_cleanly(family, tmp_path):
    odd = write_family(tmp_path / "odd", (0.01,), config=tiny_llama_config(intermediate_size=48))
    recipe = write_recipe(
        tmp_path / "nan.yml",
        {
            "merge_method": "nan",
            "base_model": str(family[0]),
            "models": [{"model": str(family[1])}, {"model": str(odd[1])}],
        },
    )
    out = tmp_path / "c.csv"
    result = run_command("mergekit-nan", "inspect", recipe, "-q", "--csv", out)
    assert_clean_failure(result, out, "'model.layers.0.mlp.", str(odd[1]), str(family[0]), "48")


# -- peak memory on a multi-shard checkpoint ---------------------------------------------------

MEMORY_PROBE = r"""
import json, resource, sys
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from mergekit_nan.commands.inspection.coefficient_pass import inspect_recipe

def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])

config = MergeConfiguration.model_validate(json.loads(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size to the current one
before = peak_kib()
inspection = inspect_recipe(config, options=MergeOptions(quiet=True))
print(json.dumps({"peak_increase": (peak_kib() - before) * 1024,
                  "tensors": len(inspection.tensors)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_inspect_peak_memory_is_about_one_tensor_per_input(tmp_path):
    config = tiny_llama_config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    family = write_family(tmp_path / "big", (0.01, 0.02, 0.04), config=config, max_shard_size="8MB")
    assert len(list(family[1].glob("*.safetensors"))) > 8
    sizes = [t.numel() * 4 for t in load_model_tensors(family[1]).values()]
    model_bytes, largest = sum(sizes), max(sizes)
    recipe = {
        "merge_method": "nan",
        "base_model": str(family[0]),
        "models": [{"model": str(p)} for p in family[1:]],
    }
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, json.dumps(recipe)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["tensors"] == 3 + 9 * 12
    increase = measured["peak_increase"]
    print(
        f"\ninspect peak RSS increase {increase / 2**20:.1f} MiB; one tensor per input "
        f"{4 * largest / 2**20:.1f} MiB; all four models {4 * model_bytes / 2**20:.1f} MiB"
    )
    # Four inputs (base + 3 fine-tunes). Loading whole models would need 4 * model_bytes;
    # streaming needs about one tensor per input, plus the open shard of each loader.
    assert increase < model_bytes


# -- demo ------------------------------------------------------------------------------------


def test_demo_runs_offline_with_the_installed_command(tmp_path):
    out = tmp_path / "demo"
    result = run_command("mergekit-nan", "demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "warn" not in (result.stdout + result.stderr).lower()
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout
    assert list((out / "merged").glob("*.safetensors"))
    recipe = yaml.safe_load((out / "nan.yml").read_text())
    assert recipe["merge_method"] == "nan"
    # the tiny models carry a tokenizer, which the merge copies
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "merged" / name).read_bytes() == (out / "models" / "base" / name).read_bytes()
    # the command the demo suggests next, and the stock mergekit-yaml on its models
    suggested = result.stdout.split("Next: ")[1].split()
    assert suggested[:2] == ["mergekit-nan", "inspect"]
    following = run_command(*suggested, cwd=tmp_path)
    assert following.returncode == 0, following.stderr
    stock = run_command("mergekit-yaml", str(out / "nan.yml"), str(tmp_path / "stock"))
    assert stock.returncode == 0 and "Traceback" not in stock.stderr
    assert "Failed to copy tokenizer" not in stock.stderr
    assert (tmp_path / "stock" / "tokenizer.json").exists()
    # The printed self-check is an independent float64 reconstruction of the merge.
    error = float(result.stdout.split("sum alpha_i delta_i)| = ")[1].split()[0])
    assert error < 1e-6
