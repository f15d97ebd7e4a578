"""``mergekit-nan check`` on odd checkpoints: architectures, shapes, vocabularies, dtypes,
pickles, truncated files, and the command's exit codes, JSON report, inspect and freeze.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Dict

import pytest
import safetensors
import torch
from support import (
    build_recipe,
    load_model_tensors,
    report_codes,
    run_command,
    stored_shapes,
    tensor_nbytes,
    write_recipe,
)
from transformers import LlamaForCausalLM

from mergekit_nan.commands.tiny import tiny_llama_config, write_model
from mergekit_nan.doctor.check import check_recipe


def odd_model(root: Path, name: str, **overrides: int) -> Path:
    """A tiny Llama with a different shape (vocabulary, MLP width, ...)."""
    config = tiny_llama_config(**overrides)
    torch.manual_seed(1)
    return write_model(root / name, LlamaForCausalLM(config).state_dict(), config=config).resolve()


def copy_with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def odd(family, tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    models = {
        "vocab": odd_model(root, "vocab130", vocab_size=130),
        "wide": odd_model(root, "wide", intermediate_size=80),
        "mistral": copy_with_config(
            family[1], root / "mistral", architectures=["MistralForCausalLM"], model_type="mistral"
        ),
    }
    state = load_model_tensors(family[1])
    models["bf16"] = write_model(root / "bf16", state, dtype=torch.bfloat16).resolve()
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(family[1] / "config.json", pickled / "config.json")
    torch.save(state, pickled / "pytorch_model.bin")
    models["pickled"] = pickled
    truncated = root / "truncated"
    shutil.copytree(family[2], truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[: 8 + length])  # the header, no tensor data
    models["truncated"] = truncated
    return models


# -- architectures, shapes, vocabularies, dtypes -------------------------------------------


def test_architecture_mismatch_is_a_warning(family, odd):
    report = check_recipe(build_recipe([family[1], odd["mistral"]], base=family[0], dtype=None))
    assert report_codes(report) == [("warning", "architecture-mismatch")]
    (finding,) = report.warnings
    assert finding.where == "models[1].model"
    assert "MistralForCausalLM" in finding.message and "LlamaForCausalLM" in finding.message
    assert "--allow-crimes" in finding.message


def test_shape_mismatch_names_tensor_and_both_models(family, odd):
    report = check_recipe(build_recipe([family[1], odd["wide"]], base=family[0], dtype=None))
    mismatched = {f.tensor: f for f in report.findings if f.code == "shape-mismatch"}
    base, wide = stored_shapes(family[0]), stored_shapes(odd["wide"])
    expected = {name for name in base if base[name][0] != wide[name][0]}
    assert expected and set(mismatched) == expected
    finding = mismatched["model.layers.1.mlp.down_proj.weight"]
    assert finding.level == "error" and finding.where == "models[1].model"
    assert str(odd["wide"]) in finding.message and str(family[0]) in finding.message
    assert "[32, 80]" in finding.message and "[32, 64]" in finding.message
    assert "'model.layers.1.mlp.down_proj.weight'" in finding.message


def test_many_shape_mismatches_are_counted(family, tmp_path):
    broad = odd_model(tmp_path, "broad", hidden_size=48)
    report = check_recipe(build_recipe([family[1], broad], base=family[0], dtype=None))
    base, other = stored_shapes(family[0]), stored_shapes(broad)
    differing = [name for name in base if base[name][0] != other[name][0]]
    named = [f for f in report.errors if f.tensor is not None]
    (rest,) = [f for f in report.errors if f.tensor is None]
    assert len(named) == 8 and {f.tensor for f in named} <= set(differing)
    assert rest.code == "shape-mismatch" and rest.where == "models[1].model"
    assert rest.message.startswith(f"{len(differing) - 8} more tensors of {broad} differ")
    assert f"({len(differing)} in all)" in rest.message


def test_vocab_mismatch_hints_at_tokenizer_source(family, odd):
    report = check_recipe(build_recipe([family[1], odd["vocab"]], base=family[0], dtype=None))
    (vocab,) = [f for f in report.findings if f.code == "vocab-mismatch"]
    assert vocab.level == "warning" and "130" in vocab.message and "128" in vocab.message
    assert "tokenizer_source: union" in vocab.fix and "tokenizer_source: base" in vocab.fix
    rows = {f.tensor for f in report.findings if f.code == "shape-mismatch"}
    assert rows == {"model.embed_tokens.weight", "lm_head.weight"}
    # with a tokenizer source the rows are aligned by mergekit: no shape error, an info
    aligned = check_recipe(
        build_recipe(
            [family[1], odd["vocab"]], base=family[0], tokenizer_source="union", dtype=None
        )
    )
    assert report_codes(aligned) == [("info", "vocab-mismatch")]


def test_dtype_mismatch_warns_without_a_recipe_dtype(family, odd):
    report = check_recipe(build_recipe([family[1], odd["bf16"]], base=family[0], dtype=None))
    assert report_codes(report) == [("warning", "dtype-mismatch")]
    assert "bfloat16" in report.warnings[0].message and "float32" in report.warnings[0].message
    converted = check_recipe(
        build_recipe([family[1], odd["bf16"]], base=family[0], dtype="float32")
    )
    assert report_codes(converted) == [("info", "dtype-mismatch")]


def test_pickled_weights_are_not_unpickled(family, odd, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check unpickled a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    report = check_recipe(build_recipe([family[1], odd["pickled"]], base=family[0], dtype=None))
    assert report_codes(report) == [("info", "shapes-unchecked")]
    assert report.findings[0].where == "models[1].model"
    size = os.path.getsize(odd["pickled"] / "pytorch_model.bin")
    headers = sum(tensor_nbytes(*v) for m in family[:2] for v in stored_shapes(m).values())
    assert report.estimate.read_bytes == headers + size


def test_incomplete_models(family, tmp_path):
    sharded = write_model(
        tmp_path / "sharded", load_model_tensors(family[1]), max_shard_size="40KB"
    ).resolve()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # a complete sharded model reads like the single-file one
    whole = check_recipe(build_recipe([family[1], sharded], base=family[0], dtype=None))
    assert report_codes(whole) == []
    assert whole.estimate.read_bytes == sum(
        tensor_nbytes(*v)
        for m in (family[0], family[1], family[1])
        for v in stored_shapes(m).values()
    )
    (sharded / shards[-1]).unlink()
    no_config = tmp_path / "no-config"
    shutil.copytree(family[2], no_config)
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(family[3] / "config.json", no_weights / "config.json")
    report = check_recipe(
        build_recipe([sharded, no_config, no_weights], base=family[0], dtype=None)
    )
    found = {f.where: f.message for f in report.findings if f.code == "incomplete-model"}
    assert set(found) == {"models[0].model", "models[1].model", "models[2].model"}
    assert f"shard {shards[-1]} listed in its index is missing" in found["models[0].model"]
    assert "no config.json" in found["models[1].model"]
    assert "no model.safetensors or pytorch_model.bin" in found["models[2].model"]
    assert report.exit_code() == 1


# -- no tensor data is read ----------------------------------------------------------------


def test_truncated_safetensors_is_checked_from_its_header(family, odd, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    report = check_recipe(build_recipe([family[1], odd["truncated"]], base=family[0], dtype=None))
    complete = check_recipe(build_recipe([family[1], family[2]], base=family[0], dtype=None))
    (truncated,) = report.errors
    assert truncated.code == "incomplete-model" and truncated.where == "models[1].model"
    assert "truncated" in truncated.message and "model.safetensors" in truncated.message
    # the header alone gave the plan and the estimate
    assert not any(f.code == "plan-failed" for f in report.findings)
    assert report.estimate == complete.estimate
    assert report.estimate.output_tensors == len(stored_shapes(family[0]))


# -- the command: exit codes, JSON, inspect/freeze -----------------------------------------


def test_exit_codes_and_strict(family, odd, tmp_path):
    clean = write_recipe(
        tmp_path / "clean.yml", build_recipe(family[1:], base=family[0], dtype=None)
    )
    warned = write_recipe(
        tmp_path / "warn.yml", build_recipe([family[1], odd["mistral"]], base=family[0], dtype=None)
    )
    failed = write_recipe(
        tmp_path / "fail.yml", build_recipe([family[1], odd["wide"]], base=family[0], dtype=None)
    )
    result = run_command("mergekit-nan", "check", clean)
    assert result.returncode == 0 and result.stdout.strip().endswith("0 errors, 0 warnings")
    assert run_command("mergekit-nan", "check", clean, "--strict").returncode == 0
    assert run_command("mergekit-nan", "check", warned).returncode == 0
    result = run_command("mergekit-nan", "check", warned, "--strict")
    assert result.returncode == 1 and "0 errors, 1 warning" in result.stdout
    result = run_command("mergekit-nan", "check", failed)
    assert result.returncode == 1 and "6 errors, 0 warnings" in result.stdout
    assert run_command("mergekit-nan", "check", tmp_path / "no-such-recipe.yml").returncode == 2
    assert run_command("mergekit-nan", "check", clean, "--no-such-option").returncode == 2


def test_json_report(family, odd, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", build_recipe([family[1], odd["vocab"]], base=family[0], dtype=None)
    )
    target = tmp_path / "report.json"
    result = run_command("mergekit-nan", "check", recipe, "--json", target)
    assert result.returncode == 1
    written = json.loads(target.read_text())
    report = check_recipe(recipe)
    assert written["errors"] == 2 and written["warnings"] == 1
    assert written["findings"] == [f.to_json() for f in report.findings]
    assert {f["code"] for f in written["findings"]} == {
        "shape-mismatch",
        "vocab-mismatch",
        "estimate",
    }
    assert written["estimates"][0]["read_bytes"] == report.estimate.read_bytes
    assert written["estimates"][0]["largest"]["name"] == "model.embed_tokens.weight"
    assert sorted(os.listdir(tmp_path)) == ["r.yml", "report.json"]  # no temporary left


def test_inspect_and_freeze_stop_on_errors_before_writing(family, odd, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read before the check stopped the command")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    recipe = write_recipe(
        tmp_path / "r.yml", build_recipe([family[1], odd["wide"]], base=family[0], dtype=None)
    )
    for command in (
        ["inspect", "--json", tmp_path / "c.json"],
        ["freeze", "-o", tmp_path / "f.yml"],
    ):
        result = run_command("mergekit-nan", command[0], recipe, "-q", *command[1:])
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: models[1].model [model.layers.0.mlp.up_proj.weight]: ")
        assert line.endswith(f"(and 5 more: mergekit-nan check {recipe} lists them)")
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]


def test_inspect_and_freeze_print_warnings_and_go_on(family, odd, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml", build_recipe([family[1], odd["bf16"]], base=family[0], dtype=None)
    )
    result = run_command("mergekit-nan", "inspect", recipe, "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: models[1].model: ")
    assert "dtype-mismatch" not in result.stdout and "alpha per model" in result.stdout
    result = run_command("mergekit-nan", "freeze", recipe, "-q", "-o", tmp_path / "frozen.yml")
    assert result.returncode == 0 and "warning: models[1].model" in result.stderr
    assert (tmp_path / "frozen.yml").exists()
