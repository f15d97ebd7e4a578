"""``mergekit-nan check`` on the tiny checkpoints: one test per kind of finding.

Expected numbers come from the checkpoints themselves, read here with
safetensors and torch (not with the header reader under test).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections import namedtuple
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import safetensors
import torch
import yaml
from click.testing import CliRunner
from support import load_model_tensors, run_command
from transformers import LlamaForCausalLM

from mergekit_nan.commands.cli import main
from mergekit_nan.commands.tiny import tiny_llama_config, write_model
from mergekit_nan.doctor.check import check_recipe


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_recipe(path: Path, recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def nan_recipe(base: Path, *models: Path, **extra) -> Dict:
    return {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        **extra,
    }


def codes(report) -> List[Tuple[str, str]]:
    return [(f.level, f.code) for f in report.findings if f.code != "estimate"]


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


# -- expected numbers, from the checkpoints ------------------------------------------------


def stored(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor, as torch loads them."""
    return {name: (tuple(t.shape), t.dtype) for name, t in load_model_tensors(path).items()}


def nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# -- model not found -----------------------------------------------------------------------


def test_model_not_found_names_model_and_place(family, tmp_path):
    recipe = nan_recipe(
        family[0],
        family[1],
        tmp_path / "no-such-model",
        f"{family[2]}+{tmp_path / 'no-such-adapter'}",
    )
    recipe["models"].append({"model": "nobody-here/no-such-repo"})
    report = check_recipe(recipe)
    missing = {f.where: f for f in report.findings if f.code == "model-not-found"}
    assert set(missing) == {"models[1].model", "models[2].model", "models[3].model"}
    assert all(f.level == "error" for f in missing.values())
    assert str(tmp_path / "no-such-model") in missing["models[1].model"].message
    assert "adapter" in missing["models[2].model"].message
    assert f"{family[2]}+{tmp_path / 'no-such-adapter'}" in missing["models[2].model"].message
    hub = missing["models[3].model"]
    assert "nobody-here/no-such-repo" in hub.message and "Hugging Face cache" in hub.message
    assert "hf download nobody-here/no-such-repo" in hub.fix
    # the command the fix names is installed with huggingface_hub
    assert "hf" in {entry.name for entry in entry_points(group="console_scripts")}
    # no plan without the models, but no crash either
    assert not any(f.code == "plan-failed" for f in report.findings)


def test_model_in_hugging_face_cache_is_found_offline(family, tmp_path):
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-ft" / "snapshots" / "0123abcd"
    shutil.copytree(family[1], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    recipe = nan_recipe(family[0], family[2])
    recipe["models"].append({"model": "tiny-org/tiny-ft"})
    from mergekit.options import MergeOptions

    report = check_recipe(recipe, options=MergeOptions(transformers_cache=str(tmp_path / "hub")))
    assert codes(report) == []  # found, and planned from the cache
    assert report.estimate.output_tensors == len(stored(family[0]))
    expected = sum(
        nbytes(*v) for m in (family[0], family[2], family[1]) for v in stored(m).values()
    )
    assert report.estimate.read_bytes == expected


# -- architectures, shapes, vocabularies, dtypes -------------------------------------------


def test_architecture_mismatch_is_a_warning(family, odd):
    report = check_recipe(nan_recipe(family[0], family[1], odd["mistral"]))
    assert codes(report) == [("warning", "architecture-mismatch")]
    (finding,) = report.warnings
    assert finding.where == "models[1].model"
    assert "MistralForCausalLM" in finding.message and "LlamaForCausalLM" in finding.message
    assert "--allow-crimes" in finding.message


def test_shape_mismatch_names_tensor_and_both_models(family, odd):
    report = check_recipe(nan_recipe(family[0], family[1], odd["wide"]))
    mismatched = {f.tensor: f for f in report.findings if f.code == "shape-mismatch"}
    base, wide = stored(family[0]), stored(odd["wide"])
    expected = {name for name in base if base[name][0] != wide[name][0]}
    assert expected and set(mismatched) == expected
    finding = mismatched["model.layers.1.mlp.down_proj.weight"]
    assert finding.level == "error" and finding.where == "models[1].model"
    assert str(odd["wide"]) in finding.message and str(family[0]) in finding.message
    assert "[32, 80]" in finding.message and "[32, 64]" in finding.message
    assert "'model.layers.1.mlp.down_proj.weight'" in finding.message


def test_many_shape_mismatches_are_counted(family, tmp_path):
    broad = odd_model(tmp_path, "broad", hidden_size=48)
    report = check_recipe(nan_recipe(family[0], family[1], broad))
    base, other = stored(family[0]), stored(broad)
    differing = [name for name in base if base[name][0] != other[name][0]]
    named = [f for f in report.errors if f.tensor is not None]
    (rest,) = [f for f in report.errors if f.tensor is None]
    assert len(named) == 8 and {f.tensor for f in named} <= set(differing)
    assert rest.code == "shape-mismatch" and rest.where == "models[1].model"
    assert rest.message.startswith(f"{len(differing) - 8} more tensors of {broad} differ")
    assert f"({len(differing)} in all)" in rest.message


def test_vocab_mismatch_hints_at_tokenizer_source(family, odd):
    report = check_recipe(nan_recipe(family[0], family[1], odd["vocab"]))
    (vocab,) = [f for f in report.findings if f.code == "vocab-mismatch"]
    assert vocab.level == "warning" and "130" in vocab.message and "128" in vocab.message
    assert "tokenizer_source: union" in vocab.fix and "tokenizer_source: base" in vocab.fix
    rows = {f.tensor for f in report.findings if f.code == "shape-mismatch"}
    assert rows == {"model.embed_tokens.weight", "lm_head.weight"}
    # with a tokenizer source the rows are aligned by mergekit: no shape error, an info
    aligned = check_recipe(nan_recipe(family[0], family[1], odd["vocab"], tokenizer_source="union"))
    assert codes(aligned) == [("info", "vocab-mismatch")]


def test_dtype_mismatch_warns_without_a_recipe_dtype(family, odd):
    report = check_recipe(nan_recipe(family[0], family[1], odd["bf16"]))
    assert codes(report) == [("warning", "dtype-mismatch")]
    assert "bfloat16" in report.warnings[0].message and "float32" in report.warnings[0].message
    converted = check_recipe(nan_recipe(family[0], family[1], odd["bf16"], dtype="float32"))
    assert codes(converted) == [("info", "dtype-mismatch")]


def test_pickled_weights_are_not_unpickled(family, odd, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check unpickled a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    report = check_recipe(nan_recipe(family[0], family[1], odd["pickled"]))
    assert codes(report) == [("info", "shapes-unchecked")]
    assert report.findings[0].where == "models[1].model"
    size = os.path.getsize(odd["pickled"] / "pytorch_model.bin")
    headers = sum(nbytes(*v) for m in family[:2] for v in stored(m).values())
    assert report.estimate.read_bytes == headers + size


def test_incomplete_models(family, tmp_path):
    sharded = write_model(
        tmp_path / "sharded", load_model_tensors(family[1]), max_shard_size="40KB"
    ).resolve()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # a complete sharded model reads like the single-file one
    whole = check_recipe(nan_recipe(family[0], family[1], sharded))
    assert codes(whole) == []
    assert whole.estimate.read_bytes == sum(
        nbytes(*v) for m in (family[0], family[1], family[1]) for v in stored(m).values()
    )
    (sharded / shards[-1]).unlink()
    no_config = tmp_path / "no-config"
    shutil.copytree(family[2], no_config)
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(family[3] / "config.json", no_weights / "config.json")
    report = check_recipe(nan_recipe(family[0], sharded, no_config, no_weights))
    found = {f.where: f.message for f in report.findings if f.code == "incomplete-model"}
    assert set(found) == {"models[0].model", "models[1].model", "models[2].model"}
    assert f"shard {shards[-1]} listed in its index is missing" in found["models[0].model"]
    assert "no config.json" in found["models[1].model"]
    assert "no model.safetensors or pytorch_model.bin" in found["models[2].model"]
    assert report.exit_code() == 1


# -- estimate and disk ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_estimate_matches_the_checkpoints(family, dtype):
    extra = {"dtype": dtype} if dtype else {}
    report = check_recipe(nan_recipe(family[0], *family[1:], **extra))
    estimate = report.estimate
    tensors = [stored(m) for m in family]
    assert estimate.read_bytes == sum(nbytes(*v) for t in tensors for v in t.values())
    assert estimate.read_bytes == sum(
        os.path.getsize(m / "model.safetensors") - 8 - header_length(m) for m in family
    )
    out = torch.bfloat16 if dtype else torch.float32
    base = tensors[0]
    assert estimate.output_tensors == len(base)
    assert estimate.output_bytes == sum(nbytes(shape, out) for shape, _ in base.values())
    numel = max(math.prod(shape) for shape, _ in base.values())
    name = estimate.largest.name  # embed_tokens and lm_head tie here
    assert math.prod(base[name][0]) == numel and estimate.largest.shape == base[name][0]
    assert estimate.largest.nbytes == nbytes(base[name][0], out)
    # peak: 4 inputs (3 fine-tunes and the base) in the compute dtype, plus the output
    size = torch.empty((), dtype=out).element_size()
    assert estimate.peak_bytes == 4 * numel * size + numel * size
    (info,) = [f for f in report.findings if f.code == "estimate"]
    assert info.level == "info" and name in info.message


def header_length(model: Path) -> int:
    with open(model / "model.safetensors", "rb") as file:
        return struct.unpack("<Q", file.read(8))[0]


Usage = namedtuple("Usage", "total used free")


def test_disk_space_at_out_path(family, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family[0], *family[1:]))
    target = tmp_path / "not" / "yet" / "there"
    probed = []

    def usage(path):
        probed.append(path)
        return Usage(10**9, 10**9 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    free = 10**12
    result = invoke("check", recipe, "--out-path", target)
    assert result.exit_code == 0, result.output
    assert probed == [str(tmp_path)]  # the nearest existing parent
    report = check_recipe(recipe, out_path=str(target))
    assert report.estimate.free_bytes == free
    output = sum(nbytes(*v) for v in stored(family[0]).values())
    free = output - 1
    result = invoke("check", recipe, "--out-path", target)
    assert result.exit_code == 1
    assert "error: the merged model needs about" in result.stdout
    (disk,) = [f for f in check_recipe(recipe, out_path=str(target)).errors]
    assert disk.code == "disk-space" and str(target) in disk.message


# -- no tensor data is read ----------------------------------------------------------------


def test_truncated_safetensors_is_checked_from_its_header(family, odd, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    report = check_recipe(nan_recipe(family[0], family[1], odd["truncated"]))
    complete = check_recipe(nan_recipe(family[0], family[1], family[2]))
    (truncated,) = report.errors
    assert truncated.code == "incomplete-model" and truncated.where == "models[1].model"
    assert "truncated" in truncated.message and "model.safetensors" in truncated.message
    # the header alone gave the plan and the estimate
    assert not any(f.code == "plan-failed" for f in report.findings)
    assert report.estimate == complete.estimate
    assert report.estimate.output_tensors == len(stored(family[0]))


# -- planning, multi-document recipes ------------------------------------------------------


def test_plan_failure_is_one_error(family):
    recipe = {
        "merge_method": "nan",
        "slices": [
            {
                "sources": [
                    {"model": str(family[1]), "layer_range": [0, 2]},
                    {"model": str(family[2]), "layer_range": [0, 1]},
                ]
            }
        ],
    }
    report = check_recipe(recipe)
    (failed,) = [f for f in report.findings if f.code == "plan-failed"]
    assert failed.level == "error" and "same number of layers" in failed.message
    assert "\n" not in failed.message


def test_multi_document_recipe_checks_each_stage(family, tmp_path):
    first = {"name": "first", **nan_recipe(family[0], family[1], family[2])}
    final = {
        "merge_method": "linear",
        "models": [
            {"model": "first", "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / "missing"), "parameters": {"weight": 1.0}},
        ],
    }
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([first, final]), encoding="utf-8")
    report = check_recipe(path)
    places = {(f.code, f.where) for f in report.findings}
    assert ("model-not-found", "final:models[1].model") in places
    assert ("plan-skipped", "final") in places
    assert ("estimate", "first") in places
    assert [e.stage for e in report.estimates] == ["first", "final"]
    assert report.estimates[0].output_tensors == len(stored(family[0]))


# -- the command: exit codes, JSON, inspect/freeze -----------------------------------------


def test_exit_codes_and_strict(family, odd, tmp_path):
    clean = write_recipe(tmp_path / "clean.yml", nan_recipe(family[0], *family[1:]))
    warned = write_recipe(tmp_path / "warn.yml", nan_recipe(family[0], family[1], odd["mistral"]))
    failed = write_recipe(tmp_path / "fail.yml", nan_recipe(family[0], family[1], odd["wide"]))
    result = invoke("check", clean)
    assert result.exit_code == 0 and result.stdout.strip().endswith("0 errors, 0 warnings")
    assert invoke("check", clean, "--strict").exit_code == 0
    assert invoke("check", warned).exit_code == 0
    result = invoke("check", warned, "--strict")
    assert result.exit_code == 1 and "0 errors, 1 warning" in result.stdout
    result = invoke("check", failed)
    assert result.exit_code == 1 and "6 errors, 0 warnings" in result.stdout
    assert invoke("check", tmp_path / "no-such-recipe.yml").exit_code == 2
    assert invoke("check", clean, "--no-such-option").exit_code == 2


def test_json_report(family, odd, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family[0], family[1], odd["vocab"]))
    target = tmp_path / "report.json"
    result = invoke("check", recipe, "--json", target)
    assert result.exit_code == 1
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
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family[0], family[1], odd["wide"]))
    for command in (
        ["inspect", "--json", tmp_path / "c.json"],
        ["freeze", "-o", tmp_path / "f.yml"],
    ):
        result = invoke(command[0], recipe, "-q", *command[1:])
        assert result.exit_code == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: models[1].model [model.layers.0.mlp.up_proj.weight]: ")
        assert line.endswith(f"(and 5 more: mergekit-nan check {recipe} lists them)")
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]


def test_inspect_and_freeze_print_warnings_and_go_on(family, odd, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family[0], family[1], odd["bf16"]))
    result = invoke("inspect", recipe, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: models[1].model: ")
    assert "dtype-mismatch" not in result.stdout and "alpha per model" in result.stdout
    result = invoke("freeze", recipe, "-q", "-o", tmp_path / "frozen.yml")
    assert result.exit_code == 0 and "warning: models[1].model" in result.stderr
    assert (tmp_path / "frozen.yml").exists()


def test_installed_command(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", nan_recipe(family[0], *family[1:]))
    start = time.perf_counter()
    result = run_command("mergekit-nan", "check", str(recipe), "--json", str(tmp_path / "r.json"))
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2] == "0 errors, 0 warnings"
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == 0
    print(f"mergekit-nan check on the tiny family: {elapsed:.2f} s")


def test_recipe_findings_come_through_once(family, tmp_path):
    from mergekit_nan.doctor.recipe_checks import recipe_findings

    data = nan_recipe(family[0], *family[1:], parameters={"nan_exponet": 2.0})
    expected = recipe_findings(data)
    assert expected, "the typo should be a finding of the recipe"
    result = invoke("check", write_recipe(tmp_path / "r.yml", data))
    assert result.exit_code == 0
    report = check_recipe(data)
    assert [f for f in report.findings if f.code != "estimate"] == expected
    for finding in expected:
        assert result.stdout.count(finding.line()) == 1
    assert result.stderr == ""  # the stock-command guard stays out of check's own planning
