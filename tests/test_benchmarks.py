"""Smoke tests of the benchmark scripts at their tiny size: expected rows, finite numbers.

They check that the scripts run end to end and report what they promise;
they never assert anything about speed or accuracy.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from support import (
    benchmark_folder,
    benchmark_script,
    command,
    documented_arguments,
    nan_alphas,
    run_benchmark,
)

PAIRS = (
    "nan vs linear",
    "nan (no base) vs linear (no base)",
    "ties+nan vs ties",
    "dare_ties+nan vs dare_ties",
)
METHODS = (
    "nan",
    "linear",
    "nan (no base)",
    "linear (no base)",
    "ties+nan",
    "ties",
    "dare_ties+nan",
    "dare_ties",
)
MERGE_MODEL_PAIR = "nan [mergekit-nan merge --granularity model] vs nan [mergekit-yaml]"
State = Dict[str, torch.Tensor]


def _finite(values: List[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def _merge_command_present() -> bool:
    return "merge" in command("mergekit-nan").commands


def test_overhead_tiny(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    cache = tmp_path / "cache"
    arguments = documented_arguments("overhead.py")
    stdout = run_benchmark("overhead.py", *arguments, "--cache", str(cache), "--json", str(out))
    pairs = list(PAIRS)
    if _merge_command_present():
        pairs.append(MERGE_MODEL_PAIR)
    else:
        assert "the --granularity model pair is skipped" in stdout
    for pair in pairs:
        assert f"| {pair} |" in stdout
    assert "| NAN coefficient pass" in stdout and "| plain read" in stdout
    payload = json.loads(out.read_text())
    assert payload["pairs"] == pairs
    for pair in pairs:
        methods = sorted(m["method"] for m in payload["merges"] if m["pair"] == pair)
        assert methods == sorted(pair.split(" vs "))
    for merge in payload["merges"]:
        assert merge["wall_s"] > 0 and merge["max_rss"] > 0 and merge["cpu_s"] > 0
    norms = payload["norm_pass"]
    assert _finite([norms["plain_gb_s"], norms["nan_gb_s"]])
    assert norms["plain_gb_s"] > 0 and norms["nan_gb_s"] > 0
    assert {"cpu", "cores", "ram", "torch", "date", "load_at_start"} <= set(payload["machine"])
    probes = payload["largest_tensor_peak_growth"]
    assert set(probes) == set(METHODS) and all(v >= 0 for vs in probes.values() for v in vs)
    model = payload["model"]
    assert (model["inputs"], model["largest_numel"]) == (4, 256 * 64)
    # Without --keep the built checkpoints and merge outputs are gone.
    assert not any(cache.glob("llama-tiny-*")) and not any(cache.glob("work-*"))
    table = run_benchmark("overhead.py", "--size-table", str(out))
    linear = [m["max_rss"] for m in payload["merges"] if m["method"] == "linear"]
    row = "| tiny | 5B (default) | 0.12M | 4 | 0.02 | 0 | 1 |"
    assert row in table and f"| {linear[0] / 2**20:.0f} | " in table
    for merge in payload["merges"]:
        assert 0 < merge["peak_anon"] <= merge["max_rss"] and merge["peak_file"] > 0


def test_overhead_resume_runs_only_missing_merges(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    common = ["--size", "tiny", "--pairs", "nan", "--norm-repeats", "0", "--probe-repeats", "0"]
    common += ["--cache", str(tmp_path / "cache"), "--json", str(out)]
    earlier = {"pair": "nan vs linear", "method": "nan", "round": 0, "wall_s": 1.5}
    out.write_text(json.dumps({"model": {"size": "tiny"}, "merges": [{**earlier, "max_rss": 123}]}))
    run_benchmark("overhead.py", *common, "--rounds", "1", "--resume")
    merges = json.loads(out.read_text())["merges"]
    assert merges[0] == {**earlier, "max_rss": 123, "peak_anon": 0, "peak_file": 0, "cpu_s": 0.0}
    assert [(m["round"], m["method"]) for m in merges[1:]] == [(0, "linear")]
    assert merges[1]["wall_s"] > 0 and merges[1]["max_rss"] > 2**20


@pytest.fixture
def overhead_models(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(benchmark_folder("overhead_models.py")))
    return importlib.import_module("overhead_models")


@pytest.mark.parametrize("size", ["tiny", "134m", "full", "3b"])
def test_overhead_shapes_are_the_transformers_llama_layout(
    overhead_models: ModuleType, size: str
) -> None:
    transformers = pytest.importorskip("transformers")
    shape = overhead_models.FAMILIES[size].shape
    config = transformers.LlamaConfig(**shape.config())
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert dict(shape.tensors()) == expected
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    name, count = shape.largest_tensor()
    assert count == max(p.numel() for p in model.parameters()) and name in expected


def test_overhead_134m_is_smollm_135m_sized(overhead_models: ModuleType) -> None:
    # SmolLM-135M: 134,515,008 parameters with tied embeddings; 49152 x 576 embedding.
    shape = overhead_models.FAMILIES["134m"].shape
    assert shape.parameters() == 134_515_008
    assert shape.largest_tensor() == ("model.embed_tokens.weight", 49152 * 576)


def test_overhead_3b_is_llama_3_2_3b_sized(overhead_models: ModuleType) -> None:
    # Llama-3.2-3B: 3,212,749,824 parameters with tied embeddings; 128256 x 3072 embedding.
    shape = overhead_models.FAMILIES["3b"].shape
    assert shape.parameters() == 3_212_749_824
    assert shape.largest_tensor() == ("model.embed_tokens.weight", 128256 * 3072)
    assert overhead_models.FAMILIES["3b"].inputs == 3


def test_overhead_family_checkpoints(overhead_models: ModuleType, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    family = overhead_models.FAMILIES["tiny"]
    paths = overhead_models.build_family(tmp_path, "tiny", seed=3)
    assert [p.name for p in paths] == ["base", "ft0", "ft1", "ft2"]
    states = []
    for path in paths:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and sorted(p.name for p in path.glob("*.safetensors")) == shards
        state: State = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        assert {n: tuple(t.shape) for n, t in state.items()} == dict(family.shape.tensors())
        assert all(t.dtype == torch.bfloat16 for t in state.values())
        assert index["metadata"]["total_size"] == 2 * family.shape.parameters()
        states.append(state)
    base = states[0]
    assert torch.equal(base["model.norm.weight"].float(), torch.ones(64))
    matrices = [n for n, t in base.items() if t.dim() == 2]
    base_std = torch.cat([base[n].double().flatten() for n in matrices]).std().item()
    assert base_std == pytest.approx(overhead_models.INIT_STD, rel=0.05)
    for state, scale in zip(states[1:], family.delta_scales):
        delta = torch.cat([(state[n].double() - base[n].double()).flatten() for n in matrices])
        assert delta.std().item() == pytest.approx(scale * overhead_models.INIT_STD, rel=0.05)
    # Built once: a second call reuses the files instead of writing them again.
    stamp = (paths[1] / "config.json").stat().st_mtime_ns
    assert overhead_models.build_family(tmp_path, "tiny", seed=3) == paths
    assert (paths[1] / "config.json").stat().st_mtime_ns == stamp


def test_overhead_cuda_flag_needs_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the flag is exercised by the full run")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit:
        benchmark_script("overhead.py").main(["--size", "tiny", "--cuda", "--cache", str(tmp_path)])
    assert exit.value.code == 2
    assert "--cuda needs a CUDA device" in stderr.getvalue()


def test_quality_tiny(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    out = tmp_path / "quality.json"
    stdout = run_benchmark("quality.py", *documented_arguments("quality.py"), "--json", str(out))
    for heading in ("multi-task, protocol steps", "same-task, protocol epochs"):
        assert f"### {heading}" in stdout
    for row in (
        "oracle (weight ~ data volume)",
        "nan (delta, p=1) [default]",
        "nan (weights, p=2)",
        *(f"nan per {g} ({n}, p=1)" for g in ("layer", "model") for n in ("delta", "weights")),
        "ties+nan",
        "task arithmetic (uniform)",
    ):
        assert f"| {row} |" in stdout
        if row != "task arithmetic (uniform)":
            assert f"| {row} vs " in stdout  # a row of the paired table
    payload = json.loads(out.read_text())
    accuracies = [v for row in payload["accuracies"] for v in row["values"]]
    assert _finite(accuracies) and all(0.0 <= v <= 1.0 for v in accuracies)
    tasks = {row["task"] for row in payload["accuracies"]}
    assert tasks == {"digits", "wine", "breast_cancer", "iris"}
    readings = {
        (r["experiment"], r["protocol"], r["granularity"], r["nan_norm"])
        for r in payload["spearman"]
    }
    assert len(readings) == 2 * 2 * 3 * 2  # experiments x protocols x granularities x x_i
    rhos = [v for row in payload["spearman"] for v in row["values"]]
    assert all(-1.0 <= v <= 1.0 for v in rhos if math.isfinite(v))


# The quality benchmark's grouped NAN (tensor / layer / model granularity).

MLP_SHAPES = {"0.weight": (6, 5), "0.bias": (6,), "2.weight": (3, 6), "2.bias": (3,)}


@pytest.fixture
def quality_merges(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(benchmark_folder("quality_merges.py")))
    return importlib.import_module("quality_merges")


def _states(
    shapes: Dict[str, Tuple[int, ...]], scales: Sequence[float]
) -> Tuple[State, List[State]]:
    generator = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    models = [
        {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for scale in scales
    ]
    return base, models


def _reference(
    base: State, models: Sequence[State], nan_norm: str, groups: Dict[str, List[str]]
) -> State:
    """float64: one inverse-norm coefficient per model and group, base + sum a_i (m_i - base)."""
    merged = {}
    for names in groups.values():
        norms = []
        for model in models:
            squares = 0.0
            for name in names:
                x = model[name].double() - (base[name].double() if nan_norm == "delta" else 0.0)
                squares += float((x * x).sum())
            norms.append(math.sqrt(squares))
        alphas = nan_alphas(norms)
        for name in names:
            delta = sum(
                a * (m[name].double() - base[name].double()) for a, m in zip(alphas, models)
            )
            merged[name] = base[name].double() + delta
    return merged


@pytest.mark.parametrize("nan_norm", ["delta", "weights"])
def test_grouped_nan_tensor_granularity_is_the_nan_method(
    quality_merges: ModuleType, nan_norm: str
) -> None:
    from mergekit.merge_methods.api import merge_state_dicts

    base, models = _states(MLP_SHAPES, (0.1, 0.3, 1.0))
    models[1]["2.bias"] = base["2.bias"].clone()  # one zero task vector
    ours = quality_merges.grouped_nan_merge(base, models, nan_norm, "tensor")
    inputs = {"base": base, **{f"m{i}": m for i, m in enumerate(models)}}
    theirs = merge_state_dicts(inputs, "nan", parameters={"nan_norm": nan_norm}, base="base")
    assert ours.keys() == theirs.keys()
    for name in base:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("nan_norm", ["delta", "weights"])
def test_grouped_nan_matches_a_float64_reference(
    quality_merges: ModuleType, granularity: str, nan_norm: str
) -> None:
    base, models = _states(MLP_SHAPES, (0.05, 0.5, 2.0))
    groups = (
        {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
        if granularity == "layer"
        else {"": list(MLP_SHAPES)}
    )
    expected = _reference(base, models, nan_norm, groups)
    merged = quality_merges.grouped_nan_merge(base, models, nan_norm, granularity)
    for name in base:
        torch.testing.assert_close(merged[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    # Not the per-tensor merge: the group shares one coefficient per model.
    tensor = quality_merges.grouped_nan_merge(base, models, nan_norm, "tensor")
    assert not torch.allclose(merged["0.bias"], tensor["0.bias"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("nan_norm", ["delta", "weights"])
def test_grouped_nan_with_one_tensor_per_group_is_per_tensor(
    quality_merges: ModuleType, nan_norm: str
) -> None:
    base, models = _states({"0.weight": (6, 5), "1.weight": (3, 6)}, (0.1, 1.0))
    tensor = quality_merges.grouped_nan_merge(base, models, nan_norm, "tensor")
    layer = quality_merges.grouped_nan_merge(base, models, nan_norm, "layer")
    for name in base:  # bias-free Linear modules: one tensor per layer
        assert torch.equal(layer[name], tensor[name])
    single = {"0.weight": base["0.weight"]}
    singles = [{"0.weight": m["0.weight"]} for m in models]
    model = quality_merges.grouped_nan_merge(single, singles, nan_norm, "model")
    assert torch.equal(model["0.weight"], tensor["0.weight"])
    expected = quality_merges.summary_coefficients(single, singles, nan_norm, "tensor")
    assert quality_merges.summary_coefficients(single, singles, nan_norm, "model") == expected


def test_grouped_nan_keeps_untouched_tensors_and_rejects_unknown_granularity(
    quality_merges: ModuleType,
) -> None:
    base, models = _states(MLP_SHAPES, (0.1, 1.0))
    for model in models:
        model["2.bias"] = base["2.bias"].clone()
    merged = quality_merges.grouped_nan_merge(base, models, "delta", "model")
    assert torch.equal(merged["2.bias"], base["2.bias"])
    assert not torch.equal(merged["0.bias"], base["0.bias"])
    with pytest.raises(ValueError, match="granularity must be one of tensor, layer, model"):
        quality_merges.grouped_nan_merge(base, models, "delta", "block")


def test_overhead_profile_tiny(tmp_path: Path) -> None:
    arguments = documented_arguments("overhead_profile.py")
    stdout = run_benchmark("overhead_profile.py", *arguments, "--cache", str(tmp_path / "cache"))
    header = "| step | nan (no base) | linear (no base) |"
    assert header in stdout
    for step in ("wall", "cpu", "minor faults", "guard", "load", "merge", "norm pass", "save"):
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {step} |"))
        values = [float(cell.replace(",", "")) for cell in row.split("|")[2:-1]]
        assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values), row
    norm_row = next(line for line in stdout.splitlines() if line.startswith("| norm pass |"))
    assert float(norm_row.split("|")[2]) > 0 and float(norm_row.split("|")[3]) == 0
    assert "top 12 functions by own time" in stdout
