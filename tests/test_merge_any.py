"""``mergekit-nan merge`` for any recipe: stock methods checked, inputs safe, atomic, bit-identical.

A recipe without NAN goes through the same checks, output-path guard and
partial directory as a NAN recipe, and its tensors and config are byte for
byte those of the stock ``mergekit-yaml`` with the same options.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from support import (
    STALL_MARKER,
    build_recipe,
    run_merge,
    run_mergekit_yaml,
    snapshot,
    start_child,
    wait_for,
    write_recipe,
)

from mergekit_nan.commands.common.output import leftovers


def stock_recipe(family: List[Path], method: str, **parameters) -> Dict:
    """``method`` over the fine-tunes with weights 0.5/0.3/0.2 (and ``parameters``) on each."""
    base, *tuned = family
    config = build_recipe(tuned, method, base=None if method == "linear" else base)
    for entry, weight in zip(config["models"], (0.5, 0.3, 0.2)):
        entry["parameters"] = {"weight": weight, **parameters}
    return config


def model_bytes(out: Path) -> Dict[str, bytes]:
    """Every file mergekit writes for the model (not the card), by name."""
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.suffix in (".safetensors", ".json", ".bin")
    }


CASES = {
    "linear": ({}, ()),
    "ties": ({"density": 0.5}, ()),
    "dare_ties, seeded, in shards": ({"density": 0.5}, ("--out-shard-size", "20K")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stock_recipe_merges_bit_identical_to_mergekit_yaml(case, family, tmp_path):
    parameters, extra = CASES[case]
    method = case.split(",")[0]
    config = stock_recipe(family, method, **parameters)
    recipe = write_recipe(tmp_path / "recipe.yml", config)
    options = ("--random-seed", "7", *extra)
    result = run_merge(recipe, tmp_path / "ours", *options)
    assert result.stdout.strip().splitlines()[-1] == f"Merged {recipe} into {tmp_path / 'ours'}"
    run_mergekit_yaml(config, tmp_path / "stock", *options)
    ours, theirs = model_bytes(tmp_path / "ours"), model_bytes(tmp_path / "stock")
    assert len([name for name in ours if name.endswith(".safetensors")]) >= 1
    assert ours == theirs
    if extra:
        assert len([name for name in ours if name.endswith(".safetensors")]) > 1
    # The card is mergekit's, plus the command that made the model and writes it again.
    card = (tmp_path / "ours" / "README.md").read_text()
    stock_card = (tmp_path / "stock" / "README.md").read_text()
    assert card.startswith(stock_card.replace("\n# stock\n", "\n# ours\n"))
    assert "### Merged with mergekit-nan merge" in card and f"mergekit's own `{method}`" in card
    command = "mergekit-nan merge mergekit_config.yml OUT_PATH --random-seed 7"
    assert command in card and "--granularity" not in card
    assert (tmp_path / "ours" / "mergekit_config.yml").read_text() == recipe.read_text()


def test_stock_writing_options_carry_over(family, tmp_path):
    config = stock_recipe(family, "linear")
    recipe = write_recipe(tmp_path / "recipe.yml", config)
    options = ("--no-safe-serialization", "--clone-tensors", "--write-threads", "2")
    run_merge(recipe, tmp_path / "ours", *options)
    run_mergekit_yaml(config, tmp_path / "stock", *options)
    ours = model_bytes(tmp_path / "ours")
    assert any(name.endswith(".bin") for name in ours)  # pickled, as asked
    assert set(ours) == set(model_bytes(tmp_path / "stock"))
    assert ours["config.json"] == model_bytes(tmp_path / "stock")["config.json"]


def test_an_input_is_refused_as_output_for_a_stock_recipe(family, tmp_path):
    config = stock_recipe(family, "ties", density=0.5)
    recipe = write_recipe(tmp_path / "recipe.yml", config)
    before = snapshot(*family)
    result = run_merge(recipe, family[0], "--overwrite", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    assert f"is the directory of input model {family[0]}" in last
    assert snapshot(*family) == before and leftovers(family[0]) == []


def test_a_stock_recipe_that_writes_nan_is_refused_before_anything_is_written(family, tmp_path):
    config = stock_recipe(family, "linear")
    config["models"][1]["parameters"]["weight"] = -0.5
    config["models"][2]["parameters"]["weight"] = 0.0
    recipe = write_recipe(tmp_path / "recipe.yml", config)
    out = tmp_path / "merged"
    result = run_merge(recipe, out, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: models: the weights of ")
    assert "sum to 0, and linear divides by that sum" in last
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []
    # The stock command merges it all the same, into NaN and Inf.
    run_mergekit_yaml(config, tmp_path / "stock")
    merged = load_file(tmp_path / "stock" / "model.safetensors").values()
    assert all(not torch.isfinite(tensor).any() for tensor in merged)


def test_nan_values_in_a_checkpoint_stop_a_stock_merge_naming_the_tensor(family, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(family[1], poisoned)
    state = load_file(poisoned / "model.safetensors")
    state["model.norm.weight"][2] = float("inf")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    config = stock_recipe([family[0], poisoned, family[2]], "linear")
    recipe = write_recipe(tmp_path / "recipe.yml", config)
    out = tmp_path / "merged"
    result = run_merge(recipe, out, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "merged tensor 'model.norm.weight' has 1 NaN/Inf values of" in last
    assert last.endswith(f"{out} was left as it was")
    assert not out.exists() and leftovers(out) == []


def test_a_killed_stock_re_merge_leaves_the_earlier_model_whole(family, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", stock_recipe(family, "ties", density=0.5))
    earlier = tmp_path / "merged"
    run_merge(recipe, earlier, "--out-shard-size", "20K")
    before = snapshot(earlier)
    other = write_recipe(tmp_path / "other.yml", stock_recipe(family, "linear"))
    arguments = ["merge", str(other), str(earlier), "--no-copy-tokenizer", "--overwrite"]
    child = start_child(
        "mergekit-nan", *arguments, "--out-shard-size", "20K", cwd=tmp_path, stall_dir=tmp_path
    )
    wait_for(tmp_path / STALL_MARKER, child)
    (partial,) = leftovers(earlier)
    assert list(partial.glob("*.safetensors"))  # the new model was on its way
    child.process.kill()
    assert child.wait() == -signal.SIGKILL
    assert snapshot(earlier) == before  # the old model, every byte, nothing of the new


def test_granularity_and_save_frozen_are_refused_on_a_stock_recipe(family, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", stock_recipe(family, "linear"))
    for option in (("--granularity", "layer"), ("--save-frozen", str(tmp_path / "f.yml"))):
        result = run_merge(recipe, tmp_path / "merged", *option, check=False)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert f"Error: {option[0]} applies only to NAN recipes" in last
        assert "merge_method is 'linear'" in last
    assert not (tmp_path / "merged").exists() and not (tmp_path / "f.yml").exists()


def test_a_multi_document_recipe_gets_a_message_that_says_what_to_do(family, tmp_path):
    stage = {**stock_recipe(family, "linear"), "name": "first"}
    final = stock_recipe(family, "linear")
    recipe = tmp_path / "multi.yml"
    recipe.write_text(yaml.safe_dump_all([stage, final]))
    result = run_merge(recipe, tmp_path / "merged", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {recipe} holds 2 recipes (a mergekit-multi file); mergekit-nan merge merges "
        "one: give each stage its own file and merge them in order with mergekit-nan merge, "
        "or run mergekit-multi (which checks NAN stages first)"
    )
    assert not (tmp_path / "merged").exists()
