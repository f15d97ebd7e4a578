"""mergekit-nan inspect and freeze on tiny checkpoints: coefficients, tables, frozen recipes, LoRA.

Expected coefficients are recomputed here in float64 from the checkpoint
tensors; "the merge used them" is checked against merged outputs of the stock
mergekit-yaml.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from mergekit.config import ConditionalParameter, evaluate_setting
from support import (
    build_recipe,
    load_model_tensors,
    nan_alphas,
    run_command,
    run_mergekit_yaml,
    tensors_of,
    write_recipe,
)

from mergekit_nan.commands.inspection.freeze import _setting

LAYERS = 2
NON_LAYER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def layer_of(name: str):
    for layer in range(LAYERS):
        if f".layers.{layer}." in name:
            return layer
    return None


def delta_norms(family: List[Path], name: str) -> List[float]:
    base = tensors_of(family[0])[name]
    return [torch.linalg.vector_norm(tensors_of(ft)[name] - base).item() for ft in family[1:]]


# -- nan with a base: filters, gradients, priors -------------------------------------------

NAN_EXPONENT = [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]
LAMBDA = [0.5, 1.0]  # gradient over the layers


def layered_recipe(family: List[Path]) -> Dict:
    """nan with a per-filter exponent, a lambda gradient and a filtered prior on ft0."""
    return build_recipe(
        family[1:],
        base=family[0],
        weights=[[{"filter": "self_attn", "value": 3.0}, {"value": 1.0}], None, None],
        parameters={"nan_exponent": NAN_EXPONENT, "lambda": LAMBDA},
        dtype=None,
    )


def expected_nan(family: List[Path], name: str):
    """(alphas, lambda) for the recipe above, from mergekit's documented semantics."""
    p = 2.0 if "mlp" in name else 1.0
    priors = [3.0 if "self_attn" in name else 1.0, 1.0, 1.0]
    layer = layer_of(name)
    t = 0.0 if layer is None else layer / (LAYERS - 1)
    lam = LAMBDA[0] + t * (LAMBDA[1] - LAMBDA[0])
    return nan_alphas(delta_norms(family, name), priors, p), lam


@pytest.fixture(scope="session")
def nan_inspected(family, tmp_path_factory):
    """``inspect --all --json --csv --plot`` on the nan recipe, plus the plugin merge."""
    root = tmp_path_factory.mktemp("nan-inspect")
    recipe = write_recipe(root / "nan.yml", layered_recipe(family))
    result = run_command(
        "mergekit-nan",
        "inspect",
        recipe,
        "--all",
        "-q",
        "--json",
        root / "c.json",
        "--csv",
        root / "c.csv",
        "--plot",
        root / "c.png",
    )
    assert result.returncode == 0, result.stderr
    merged = root / "merged"
    run_mergekit_yaml(layered_recipe(family), merged)
    return root, result.stdout, merged


def test_inspect_json_equals_float64_recomputation(family, nan_inspected):
    root, _, _ = nan_inspected
    data = json.loads((root / "c.json").read_text())
    assert data["merge_method"] == "nan" and data["stock_method"] == "task_arithmetic"
    names = [t["name"] for t in data["tensors"]]
    assert set(names) == set(tensors_of(family[0]))
    for tensor in data["tensors"]:
        alphas, lam = expected_nan(family, tensor["name"])
        got = [m["weight"] for m in tensor["models"]]
        assert got == pytest.approx(alphas, rel=1e-5), tensor["name"]
        assert tensor["scale"] == pytest.approx(lam, abs=1e-12)
        assert [m["model"] for m in tensor["models"]] == [str(p) for p in family[1:]]
        assert [m["norm"] for m in tensor["models"]] == pytest.approx(
            delta_norms(family, tensor["name"]), rel=1e-5
        )


def test_merge_used_the_inspected_coefficients(family, nan_inspected):
    root, _, merged = nan_inspected
    data = json.loads((root / "c.json").read_text())
    out = tensors_of(merged)
    base = tensors_of(family[0])
    for tensor in data["tensors"]:
        name = tensor["name"]
        expected = base[name].clone()
        for model, entry in zip(family[1:], tensor["models"]):
            expected += tensor["scale"] * entry["weight"] * (tensors_of(model)[name] - base[name])
        torch.testing.assert_close(out[name], expected, rtol=0, atol=2e-6, msg=name)


def test_table_rows_show_the_coefficients(family, nan_inspected):
    _, stdout, _ = nan_inspected
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in tensors_of(family[0]):
            rows[parts[0]] = [float(x) for x in parts[1:]]
    assert set(rows) == set(tensors_of(family[0]))
    for name, values in rows.items():
        alphas, lam = expected_nan(family, name)
        # Three alpha columns, then lambda (it varies between tensors here).
        assert values == pytest.approx(alphas + [lam], abs=6e-5), name
    assert stdout.splitlines()[1].split() == ["tensor", "ft0", "ft1", "ft2", "lambda"]


def test_layer_summary_is_the_mean_per_layer(family, nan_inspected):
    root, _, _ = nan_inspected
    result = run_command("mergekit-nan", "inspect", root / "nan.yml", "-q")
    assert result.returncode == 0
    table = result.stdout.split("\n\n")[0]  # the premise block follows the table
    lines = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    for layer in range(LAYERS):
        names = [n for n in tensors_of(family[0]) if layer_of(n) == layer]
        means = [sum(expected_nan(family, n)[0][i] for n in names) / len(names) for i in range(3)]
        values = [float(x) for x in lines[f"layer {layer}"].split()[2:]]
        assert values == pytest.approx(means + [LAMBDA[layer]], abs=6e-5)


def test_csv_and_png_are_written(family, nan_inspected):
    root, _, _ = nan_inspected
    data = json.loads((root / "c.json").read_text())
    with open(root / "c.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(data["tensors"]) * 3
    by_key = {(r["tensor"], r["model"]): r for r in rows}
    for tensor in data["tensors"]:
        for entry in tensor["models"]:
            row = by_key[(tensor["name"], entry["model"])]
            assert float(row["weight"]) == entry["weight"]
            assert float(row["norm"]) == entry["norm"]
    import matplotlib.image

    image = matplotlib.image.imread(root / "c.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    assert not list(root.glob(".c.*"))  # no temporary files left behind


# -- freeze -----------------------------------------------------------------------------------


def all_keys(node) -> List[str]:
    if isinstance(node, dict):
        return list(node) + [k for v in node.values() for k in all_keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in all_keys(v)]
    return []


def frozen_from(recipe: Path, out: Path, *extra: str) -> Dict:
    result = run_command("mergekit-nan", "freeze", recipe, "-o", out, "-q", *extra)
    assert result.returncode == 0, result.stderr
    frozen = yaml.safe_load(out.read_text())
    assert "nan" not in frozen["merge_method"]
    assert not [k for k in all_keys(frozen) if k.startswith("nan_")]
    return frozen


def test_frozen_nan_recipe_reproduces_the_merge(family, nan_inspected, tmp_path):
    root, _, merged = nan_inspected
    frozen = frozen_from(root / "nan.yml", tmp_path / "frozen.yml")
    assert frozen["merge_method"] == "task_arithmetic"
    stock = tmp_path / "stock"
    run_mergekit_yaml(frozen, stock)
    plugin, reproduced = load_model_tensors(merged), load_model_tensors(stock)
    assert set(plugin) == set(reproduced)
    for name in plugin:
        # Same update, summed in a different order: float32 rounding only.
        torch.testing.assert_close(reproduced[name], plugin[name], rtol=0, atol=5e-7)


def test_frozen_ties_plus_nan_is_bit_identical(family, tmp_path):
    recipe = {
        "merge_method": "ties+nan",
        "base_model": str(family[0]),
        "parameters": {"density": 0.5},
        "models": [
            {
                "model": str(path),
                "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
            }
            for path in family[1:]
        ],
    }
    path = write_recipe(tmp_path / "ties.yml", recipe)
    frozen = frozen_from(path, tmp_path / "frozen.yml")
    assert frozen["merge_method"] == "ties"
    assert frozen["parameters"] == {"density": 0.5}
    # The weights are NAN shares times the per-tensor total (6 in mlp, else 3).
    resolved = json.loads(json.dumps(frozen))
    for source in resolved["slices"][0]["sources"][:3]:
        for entry in source["parameters"]["weight"]:
            name = entry["filter"]
            index = [str(p) for p in family[1:]].index(source["model"])
            total = 6.0 if "mlp" in name else 3.0
            shares = nan_alphas(delta_norms(family, name), [1, 1, 1], 1.0)
            assert entry["value"] == pytest.approx(total * shares[index], rel=1e-5)
    plugin, stock = tmp_path / "plugin", tmp_path / "stock"
    run_mergekit_yaml(recipe, plugin)
    run_mergekit_yaml(frozen, stock)
    a, b = load_model_tensors(plugin), load_model_tensors(stock)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_model_granularity_freezes_one_weight_per_model(family, tmp_path):
    recipe = {"merge_method": "nan", "models": [{"model": str(p)} for p in family[1:]]}
    path = write_recipe(tmp_path / "plain.yml", recipe)
    frozen = frozen_from(path, tmp_path / "frozen.yml", "--granularity", "model")
    assert frozen["merge_method"] == "linear"
    assert frozen["parameters"] == {"normalize": False}
    whole = [
        math.sqrt(sum(float((t**2).sum()) for t in tensors_of(p).values())) for p in family[1:]
    ]
    alphas = nan_alphas(whole, [1, 1, 1], 1.0)
    weights = [s["parameters"]["weight"] for s in frozen["slices"][0]["sources"]]
    assert weights == pytest.approx(alphas, rel=1e-6)  # float32 per-tensor norms
    stock = tmp_path / "stock"
    run_mergekit_yaml(frozen, stock)
    out = tensors_of(stock)
    for name in out:
        expected = sum(a * tensors_of(p)[name] for a, p in zip(alphas, family[1:]))
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)


def test_inspect_model_granularity_json(family, tmp_path):
    recipe = write_recipe(
        tmp_path / "ta.yml",
        {
            "merge_method": "task_arithmetic+nan",
            "base_model": str(family[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in family[1:]],
        },
    )
    result = run_command(
        "mergekit-nan",
        "inspect",
        recipe,
        "-q",
        "--granularity",
        "model",
        "--json",
        tmp_path / "m.json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "m.json").read_text())
    base = tensors_of(family[0])
    whole = [
        math.sqrt(sum(float(((tensors_of(p)[n] - base[n]) ** 2).sum()) for n in base))
        for p in family[1:]
    ]
    assert list(data["model_norms"].values()) == pytest.approx(whole, rel=1e-6)
    weights = [1.5 * s for s in nan_alphas(whole, [1, 1, 1], 1.0)]
    for tensor in data["tensors"]:
        assert [m["weight"] for m in tensor["models"]] == pytest.approx(weights, rel=1e-6)
    assert "whole-model norms" in result.stdout


def test_filters_never_match_another_tensor():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 11, 111)]
    names += ["norm.weight", "model.norm.weight", "lm_head.weight", "x.lm_head.weight"]
    values = [float(i) for i in range(len(names))]
    setting = _setting(list(zip(names, values)), fallback=False)
    conditions = [ConditionalParameter(**entry) for entry in setting]
    for name, value in zip(names, values):
        assert evaluate_setting(name, conditions, validate=float) == value
    assert evaluate_setting("unlisted.weight", conditions, validate=float) is None


def test_filters_refuse_an_input_used_twice_with_different_weights():
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        _setting(
            [
                ("model.layers.0.mlp.up_proj.weight", 0.1),
                ("model.layers.0.mlp.up_proj.weight", 0.2),
            ],
            fallback=False,
        )


# -- LoRA references ---------------------------------------------------------------------------


def test_inspect_merges_lora_references_like_mergekit(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family[1])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(model, config)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    state = {k: v.detach().double() for k, v in peft_model.state_dict().items()}
    recipe = write_recipe(
        tmp_path / "lora.yml",
        {
            "merge_method": "nan",
            "base_model": str(family[0]),
            "models": [{"model": f"{family[1]}+{adapter}"}, {"model": str(family[2])}],
        },
    )
    result = run_command(
        "mergekit-nan",
        "inspect",
        recipe,
        "-q",
        "--json",
        tmp_path / "l.json",
        "--lora-merge-cache",
        tmp_path / "lora-cache",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "l.json").read_text())
    base = tensors_of(family[0])
    checked = 0
    for tensor in data["tensors"]:
        name = tensor["name"]
        adapted = tensors_of(family[1])[name].clone()
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            prefix = "base_model.model." + name[: -len(".weight")]
            a = state[f"{prefix}.lora_A.default.weight"]
            b = state[f"{prefix}.lora_B.default.weight"]
            adapted += (8 / 4) * b @ a
            checked += 1
        norms = [
            torch.linalg.vector_norm(adapted - base[name]).item(),
            torch.linalg.vector_norm(tensors_of(family[2])[name] - base[name]).item(),
        ]
        got = [m["weight"] for m in tensor["models"]]
        assert got == pytest.approx(nan_alphas(norms, [1, 1], 1.0), rel=1e-5), name
    assert checked == 2 * LAYERS
    assert data["models"][0] == f"{family[1]}+{adapter}"
