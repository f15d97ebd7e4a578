"""NAN's premise in ``inspect`` and on the model card, against a float64 recomputation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import save_file
from support import family_recipe, load_model_tensors, nan_alphas, run_command, write_recipe

SHIFTED = ("model.norm.weight", "model.layers.0.input_layernorm.weight")
"""Tensors of the shifted fine-tune whose update is mostly a constant."""


@pytest.fixture(scope="module")
def shifted_family(family, tmp_path_factory) -> List[Path]:
    """The family with ft2 replaced by ft1 plus a constant shift of two vectors."""
    root = tmp_path_factory.mktemp("shifted")
    shifted = root / "shifted"
    shutil.copytree(family[2], shifted)
    state = load_model_tensors(shifted)
    for name in SHIFTED:
        state[name] = state[name] + 0.2
    save_file(state, shifted / "model.safetensors", metadata={"format": "pt"})
    return [family[0], family[1], family[2], shifted]


def recipe_file(paths: List[Path], directory: Path, method: str = "nan") -> Path:
    config = family_recipe(paths, method, **({} if method == "nan" else {"density": 0.5}))
    return write_recipe(directory / "recipe.yml", config)


def float64_reading(paths: List[Path]) -> Dict[str, Dict]:
    """Per model: norm, layer norms, mean part, per-tensor |mean|/rms, all in float64."""
    base, *tuned = (load_model_tensors(p) for p in paths)
    found = {}
    for path, state in zip(paths[1:], tuned):
        squares, means, layers, shifts = 0.0, 0.0, {}, {}
        for name, tensor in state.items():
            x = tensor.double() - base[name].double()
            square, total = float(x.square().sum()), float(x.sum())
            squares += square
            means += total * total / x.numel()
            shifts[name] = abs(total) / math.sqrt(x.numel() * square)
            if ".layers." in name:
                layer = f"layer {name.split('.layers.')[1].split('.')[0]}"
                layers[layer] = layers.get(layer, 0.0) + square
        found[str(path)] = {
            "norm": math.sqrt(squares),
            "mean_share": means / squares,
            "layers": {k: math.sqrt(v) for k, v in layers.items()},
            "shifts": shifts,
        }
    return found


def test_inspect_shows_norms_spread_and_mean_shifts(shifted_family, tmp_path):
    recipe = recipe_file(shifted_family, tmp_path)
    out = tmp_path / "inspect.json"
    result = run_command("mergekit-nan", "inspect", str(recipe), "-q", "--json", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    expected = float64_reading(shifted_family)
    models = payload["premise"]["models"]
    total = sum(e["norm"] for e in expected.values())
    alphas = dict(zip(expected, nan_alphas([e["norm"] for e in expected.values()])))
    for model in models:
        reference = expected[model["model"]]
        assert model["norm"] == pytest.approx(reference["norm"], rel=1e-6)
        assert model["share"] == pytest.approx(reference["norm"] / total, rel=1e-6)
        assert model["coefficient"] == pytest.approx(alphas[model["model"]], rel=1e-6)
        assert model["mean_share"] == pytest.approx(reference["mean_share"], rel=1e-4, abs=1e-7)
        assert model["layer_norms"] == pytest.approx(reference["layers"], rel=1e-6)
    coefficients = [m["coefficient"] for m in models]
    assert payload["premise"]["spread"] == pytest.approx(max(coefficients) / min(coefficients))
    for tensor in payload["tensors"]:
        for entry in tensor["models"]:
            shift = expected[entry["model"]]["shifts"][tensor["name"]]
            assert entry["mean_shift"] == pytest.approx(shift, rel=1e-4, abs=1e-6)

    shifted = next(m for m in models if m["model"] == str(shifted_family[3]))
    assert set(shifted["mean_shifted_tensors"]) == set(SHIFTED)
    assert shifted["largest_mean_shift"] > 0.9
    assert all(not m["mean_shifted_tensors"] for m in models if m is not shifted)
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("info: ")]
    assert "shifted: in 2 tensors" in line and all(name in line for name in SHIFTED)
    assert "NAN moves from uniform weights by" in result.stdout


def test_the_card_records_the_norms_and_every_option_to_reproduce(family, tmp_path):
    recipe = recipe_file(family, tmp_path, "dare_ties+nan")
    out = tmp_path / "merged"
    arguments = ["merge", str(recipe), str(out), "--no-copy-tokenizer", "--random-seed", "7"]
    run_command("mergekit-nan", *arguments, "--out-shard-size", "1M", check=True)
    card = (out / "README.md").read_text()
    command = next(x for x in card.splitlines() if x.startswith("mergekit-nan merge "))
    for words in ("--granularity tensor", "--random-seed 7", "--out-shard-size 1000000"):
        assert words in command
    line = next(x for x in card.splitlines() if x.startswith("Task-vector norms (whole model):"))
    expected = float64_reading(family)
    for path, reading in expected.items():
        assert f"{Path(path).name} {reading['norm']:.4g} " in line

    again = tmp_path / "again"
    rerun = command.replace("mergekit_config.yml", str(out / "mergekit_config.yml"))
    words = rerun.split()[1:]
    words[words.index("OUT_PATH")] = str(again)
    run_command("mergekit-nan", *words, check=True)
    first, second = load_model_tensors(out), load_model_tensors(again)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_multi_gpu_reaches_mergekit_for_merge_and_inspect(family, tmp_path, monkeypatch):
    """The flag is mergekit's own option; the executor itself is exercised on GPUs (test_cuda)."""
    import mergekit_nan.commands.inspection.coefficient_pass as inspect_module
    import mergekit_nan.commands.merge.run as merge_module

    seen = {}

    def executor(tasks, storage_device=None):
        seen["inspect"] = storage_device
        raise RuntimeError("stop here")

    def run_merge(config, out_path, options, config_source=None):
        seen["merge"] = options.multi_gpu
        raise RuntimeError("stop here")

    monkeypatch.setattr(inspect_module, "MultiGPUExecutor", executor)
    monkeypatch.setattr(merge_module, "run_merge", run_merge)
    recipe = recipe_file(family, tmp_path)
    result = run_command("mergekit-nan", "inspect", str(recipe), "-q", "--multi-gpu")
    assert result.returncode == 1 and seen["inspect"] == "cpu"
    out = tmp_path / "merged"
    result = run_command("mergekit-nan", "merge", str(recipe), str(out), "--multi-gpu")
    assert result.returncode == 1 and seen["merge"] is True and not out.exists()
