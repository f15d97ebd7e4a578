"""Compatibility matrix, input and output paths: tokenizers, formats, shards, slices, multi.

Each test checks one stock-command run on tiny random checkpoints
(``compat_models``) against an independent computation: the float64 ``nan``
formula (``support.nan_merge``) or the stock method given float64 NAN
weights (``support.nan_weights``). All runs are float32, so the
tolerances are those of float32 coefficients: 1e-6 for ``nan``, 2e-6 for
``ties+nan``. Each test records and prints its max relative error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import torch
import yaml
from compat_models import (
    ADDED_TOKENS,
    VOCAB,
    VOCAB_TENSORS,
    Families,
    checkpoint_tensors,
)
from mergekit.merge_methods import merge_tensors
from support import (
    build_recipe,
    nan_merge,
    nan_weights,
    relative_error,
    report,
    run_command,
    run_mergekit_yaml,
)

NAN_TOLERANCE = 1e-6
TIES_TOLERANCE = 2e-6
DENSITY = 0.5


def paths_recipe(method: str, base: Path, tuned: Sequence[Path], **extra) -> Dict:
    parameters = {} if method == "nan" else {"density": DENSITY}
    return build_recipe(tuned, method, base=base, parameters=parameters, **extra)


def ties_reference(base: torch.Tensor, tuned: List[torch.Tensor]) -> torch.Tensor:
    """Stock ties given the float64 NAN weights of these inputs."""
    return merge_tensors(
        [base, *tuned],
        "ties",
        base_index=0,
        parameters={"weight": nan_weights(tuned, base), "density": DENSITY},
    )


def worst_error(errors: Dict[str, float], label: str, record_property) -> float:
    worst = max(errors, key=errors.get)
    report(f"{label} ({len(errors)} tensors, worst {worst})", errors[worst], record_property)
    return errors[worst]


# -- the runs, each in this process through the stock command -------------------------------


def union_run(families: Families, out: Path) -> Callable:
    family = families.with_added_tokens("llama")
    config = paths_recipe("nan", family.base, family.tuned, tokenizer_source="union")
    return lambda: run_mergekit_yaml(config, out, copy_tokenizer=True)


def base_tokenizer_run(families: Families, out: Path) -> Callable:
    family = families.with_added_tokens("qwen2")
    config = paths_recipe("ties+nan", family.base, family.tuned, tokenizer_source="base")
    return lambda: run_mergekit_yaml(config, out, copy_tokenizer=True)


def pickle_run(families: Families, out: Path) -> Callable:
    family = families.get("mistral", layout="bin")
    config = paths_recipe("nan", family.base, family.tuned)
    return lambda: run_mergekit_yaml(config, out, "--lazy-unpickle")


OUT_SHARD_SIZE = "20K"


def shards_run(families: Families, out: Path) -> Callable:
    family = families.get("qwen3", layout="sharded")
    config = paths_recipe("ties+nan", family.base, family.tuned)
    return lambda: run_mergekit_yaml(config, out, "--out-shard-size", OUT_SHARD_SIZE)


FRANKEN_SLICES = ((0, 2), (1, 2))
"""Output layers 0, 1, 2 are input layers 0, 1, 1."""


def frankenmerge_run(families: Families, out: Path) -> Callable:
    family = families.get("gpt2")
    config = {
        "merge_method": "nan",
        "base_model": str(family.base),
        "slices": [
            {"sources": [{"model": str(p), "layer_range": list(r)} for p in family.paths]}
            for r in FRANKEN_SLICES
        ],
        "dtype": "float32",
    }
    return lambda: run_mergekit_yaml(config, out)


def multi_run(families: Families, out: Path) -> Callable:
    """Stage ``ties_stage`` (ties+nan of ft0, ft1) feeds the final ``nan`` stage with ft2."""
    family = families.get("phi3")
    base, ft0, ft1, ft2 = family.paths
    stage = {"name": "ties_stage", **paths_recipe("ties+nan", base, [ft0, ft1])}
    final = paths_recipe("nan", base, [ft2])
    final["models"].insert(0, {"model": "ties_stage"})
    out.mkdir(parents=True)
    config = out / "multi.yml"
    config.write_text(yaml.safe_dump_all([stage, final]))
    arguments = [
        str(config),
        "--intermediate-dir",
        str(out / "stages"),
        "--out-path",
        str(out / "final"),
        "--no-copy-tokenizer",
    ]
    return lambda: run_command("mergekit-multi", *arguments)


RUNS = {
    "test_tokenizer_union": union_run,
    "test_tokenizer_base": base_tokenizer_run,
    "test_pytorch_bin_with_lazy_unpickle": pickle_run,
    "test_sharded_inputs_and_small_output_shards": shards_run,
    "test_frankenmerge_slices": frankenmerge_run,
    "test_mergekit_multi_ties_stage_feeds_nan": multi_run,
}
"""Test name -> the run it checks (a function of the families and the output folder)."""


@pytest.fixture
def path_runs(tiny_families, tmp_path):
    """Runs the stock command a test checks; a function of the test name, giving the output."""

    def run(name: str) -> Path:
        out = tmp_path / name
        result = RUNS[name](tiny_families, out)()
        assert result.returncode == 0, result.stderr[-4000:]
        return out

    return run


# -- tokenizers --------------------------------------------------------------------------


def test_tokenizer_union(path_runs, tiny_families, record_property):
    """ft2 adds tokens: the union vocabulary has them; common rows follow the formula."""
    from transformers import AutoTokenizer

    out = path_runs("test_tokenizer_union")
    family = tiny_families.with_added_tokens("llama")
    base, *tuned = (checkpoint_tensors(p) for p in family.paths)
    merged = checkpoint_tensors(out)
    assert set(merged) == set(base)

    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab, base_vocab = (
        tokenizer.get_vocab(),
        AutoTokenizer.from_pretrained(family.base).get_vocab(),
    )
    assert len(vocab) == VOCAB + len(ADDED_TOKENS)
    assert {word: vocab[word] for word in base_vocab} == base_vocab
    added = [vocab[token] for token in ADDED_TOKENS]
    assert sorted(added) == list(range(VOCAB, VOCAB + len(ADDED_TOKENS)))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)

    errors = {}
    for name, tensor in merged.items():
        rows = VOCAB if name in VOCAB_TENSORS else None
        if rows is not None:
            # the added rows: finite, and the donor's (every input gets ft2's row there,
            # so no task vector has a component on them)
            donor = tuned[-1][name][[VOCAB + ADDED_TOKENS.index(t) for t in ADDED_TOKENS]]
            assert torch.isfinite(tensor[added]).all(), name
            torch.testing.assert_close(tensor[added], donor, rtol=0, atol=1e-7)
        expected = nan_merge([m[name][:rows] for m in tuned], base[name][:rows])
        errors[name] = relative_error(tensor[:rows], expected)
    assert worst_error(errors, "tokenizer_source: union, nan", record_property) < NAN_TOLERANCE


def test_tokenizer_base(path_runs, tiny_families, record_property):
    """The base vocabulary: ft2's added rows are dropped, the rest is ties+nan (tied Qwen2)."""
    from transformers import AutoTokenizer

    out = path_runs("test_tokenizer_base")
    family = tiny_families.with_added_tokens("qwen2")
    base, *tuned = (checkpoint_tensors(p) for p in family.paths)
    merged = checkpoint_tensors(out)
    assert set(merged) == set(base) and "lm_head.weight" not in merged
    assert len(AutoTokenizer.from_pretrained(out).get_vocab()) == VOCAB
    assert merged["model.embed_tokens.weight"].shape[0] == VOCAB
    assert tuned[-1]["model.embed_tokens.weight"].shape[0] == VOCAB + len(ADDED_TOKENS)

    errors = {}
    for name, tensor in merged.items():
        rows = tensor.shape[0]
        expected = ties_reference(base[name], [m[name][:rows] for m in tuned])
        errors[name] = relative_error(tensor, expected)
    assert worst_error(errors, "tokenizer_source: base, ties+nan", record_property) < TIES_TOLERANCE


# -- input and output formats ------------------------------------------------------------


def test_pytorch_bin_with_lazy_unpickle(path_runs, tiny_families, record_property):
    out = path_runs("test_pytorch_bin_with_lazy_unpickle")
    family = tiny_families.get("mistral", layout="bin")
    assert all((p / "pytorch_model.bin").exists() for p in family.paths)
    base, *tuned = (checkpoint_tensors(p) for p in family.paths)
    merged = checkpoint_tensors(out)
    assert set(merged) == set(base)
    errors = {
        name: relative_error(tensor, nan_merge([m[name] for m in tuned], base[name]))
        for name, tensor in merged.items()
    }
    label = "pytorch_model.bin inputs, --lazy-unpickle, nan"
    assert worst_error(errors, label, record_property) < NAN_TOLERANCE


def test_sharded_inputs_and_small_output_shards(path_runs, tiny_families, record_property):
    out = path_runs("test_sharded_inputs_and_small_output_shards")
    family = tiny_families.get("qwen3", layout="sharded")
    assert len(list(family.base.glob("*.safetensors"))) == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {p.name for p in out.glob("*.safetensors")}
    base, *tuned = (checkpoint_tensors(p) for p in family.paths)
    merged = checkpoint_tensors(out)
    assert set(merged) == set(base) == set(index["weight_map"])
    errors = {
        name: relative_error(tensor, ties_reference(base[name], [m[name] for m in tuned]))
        for name, tensor in merged.items()
    }
    label = f"3-shard inputs, --out-shard-size {OUT_SHARD_SIZE} ({len(files)} shards), ties+nan"
    assert worst_error(errors, label, record_property) < TIES_TOLERANCE


# -- recipes -----------------------------------------------------------------------------


def source_layer(name: str) -> str:
    """The input tensor of an output tensor of the frankenmerge."""
    if not name.startswith("transformer.h."):
        return name
    index, rest = name[len("transformer.h.") :].split(".", 1)
    layers = [layer for start, end in FRANKEN_SLICES for layer in range(start, end)]
    return f"transformer.h.{layers[int(index)]}.{rest}"


def test_frankenmerge_slices(path_runs, tiny_families, record_property):
    """GPT-2 (Conv1D weights, transformer.h.N names): three output layers from two."""
    out = path_runs("test_frankenmerge_slices")
    family = tiny_families.get("gpt2")
    base, *tuned = (checkpoint_tensors(p) for p in family.paths)
    merged = checkpoint_tensors(out)
    layers = sum(end - start for start, end in FRANKEN_SLICES)
    assert json.loads((out / "config.json").read_text())["n_layer"] == layers
    per_layer = [n for n in base if n.startswith("transformer.h.0.")]
    assert len(merged) == len(base) + (layers - 2) * len(per_layer)
    errors = {}
    for name, tensor in merged.items():
        source = source_layer(name)
        errors[name] = relative_error(tensor, nan_merge([m[source] for m in tuned], base[source]))
    assert worst_error(errors, "slices frankenmerge (gpt2), nan", record_property) < NAN_TOLERANCE


def test_mergekit_multi_ties_stage_feeds_nan(path_runs, tiny_families, record_property):
    """Phi-3 (fused qkv and gate_up): the intermediate and the final merge, each checked."""
    out = path_runs("test_mergekit_multi_ties_stage_feeds_nan")
    family = tiny_families.get("phi3")
    base, ft0, ft1, ft2 = (checkpoint_tensors(p) for p in family.paths)
    stage = checkpoint_tensors(out / "stages" / "ties_stage")
    final = checkpoint_tensors(out / "final")
    assert set(stage) == set(final) == set(base)
    stage_errors = {
        name: relative_error(stage[name], ties_reference(base[name], [ft0[name], ft1[name]]))
        for name in base
    }
    final_errors = {
        name: relative_error(final[name], nan_merge([stage[name], ft2[name]], base[name]))
        for name in base
    }
    label = "mergekit-multi (phi3)"
    assert worst_error(stage_errors, f"{label}, ties+nan stage", record_property) < TIES_TOLERANCE
    assert worst_error(final_errors, f"{label}, final nan stage", record_property) < NAN_TOLERANCE
