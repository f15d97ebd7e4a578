"""One norm pass for many merges: merges that share a ``NormTable`` write what fresh ones write.

The reference for every shared merge is the same recipe merged without a
table (its own norm pass); the norms in the table are checked against float64
norms recomputed here from the checkpoint files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from support import family_recipe, load_model_tensors

from mergekit_nan import weighting
from mergekit_nan.commands.compare.candidates import norm_group
from mergekit_nan.commands.inspection.coefficient_pass import inspect_recipe
from mergekit_nan.commands.merge.run import merge_recipe
from mergekit_nan.shared_norms import NormTable, sharing

OPTIONS = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)


def _merge(recipe: Dict, out: Path) -> Dict[str, torch.Tensor]:
    merge_recipe(MergeConfiguration.model_validate(recipe), str(out), OPTIONS)
    return load_model_tensors(out)


@pytest.fixture
def norm_passes(monkeypatch) -> List[int]:
    """How many tensor groups ran the norm pass (one entry per call)."""
    calls: List[int] = []
    original = weighting.norms_and_sums

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(weighting, "norms_and_sums", counted)
    return calls


@pytest.mark.parametrize("method", ["nan", "ties+nan"])
def test_merges_sharing_a_table_run_one_norm_pass_and_write_the_same_tensors(
    family, tmp_path, norm_passes, method
):
    first = family_recipe(family, method)
    variants = {
        "exponent": family_recipe(family, method, nan_exponent=-1.0),
        "lambda": family_recipe(family, method, **{"lambda": 0.5}),
        "layer": family_recipe(family, method, nan_granularity="layer"),
        "model": family_recipe(family, method, nan_granularity="model", nan_exponent=0.5),
    }
    assert len({norm_group(r) for r in (first, *variants.values())}) == 1
    fresh = {name: _merge(r, tmp_path / "fresh" / name) for name, r in variants.items()}
    weighed = len(inspect_recipe(MergeConfiguration.model_validate(first)).tensors)
    norm_passes.clear()

    table = NormTable()
    with sharing(table):
        _merge(first, tmp_path / "shared" / "first")
    assert len(norm_passes) == weighed and table.computed == weighed and table.reused == 0
    with sharing(table):
        shared = {name: _merge(r, tmp_path / "shared" / name) for name, r in variants.items()}
    assert len(norm_passes) == weighed  # none after the first merge
    assert table.reused == len(variants) * weighed
    for name, tensors in shared.items():
        assert tensors.keys() == fresh[name].keys()
        for tensor, value in tensors.items():
            assert torch.equal(value, fresh[name][tensor]), (name, tensor)


def test_the_table_holds_the_task_vector_norms_and_keeps_other_norms_apart(
    family, tmp_path, norm_passes
):
    base, *fine_tunes = family
    table = NormTable()
    with sharing(table):
        _merge(family_recipe(family), tmp_path / "delta")
    base_tensors = load_model_tensors(base)
    name = "model.layers.0.mlp.up_proj.weight"
    models = [ModelReference.parse(str(p)) for p in fine_tunes]
    key = NormTable.key(name, models, ModelReference.parse(str(base)), base_tensors[name])
    found = table.find(key, torch.device("cpu"))
    expected = [
        torch.linalg.norm((load_model_tensors(p)[name] - base_tensors[name]).double()).item()
        for p in fine_tunes
    ]
    assert found is not None and found.dtype == torch.float32
    assert found.tolist() == pytest.approx(expected, rel=1e-6)

    # The same models with nan_norm: weights need the tensors' own norms: computed, not found.
    weights = family_recipe(family, nan_norm="weights")
    fresh = _merge(weights, tmp_path / "fresh")
    passes = len(norm_passes)
    with sharing(table):
        shared = _merge(weights, tmp_path / "weights")
    assert len(norm_passes) > passes
    for tensor, value in shared.items():
        assert torch.equal(value, fresh[tensor]), tensor


def test_sharing_blocks_do_not_nest():
    with sharing(NormTable()):
        with pytest.raises(RuntimeError, match="already"):
            with sharing(NormTable()):
                pass
    with sharing(NormTable()):  # the outer block ended cleanly
        pass


def test_norm_groups_ignore_only_what_acts_after_the_norms(family):
    recipe = family_recipe(family, nan_exponent=2.0)
    same = family_recipe(family, **{"lambda": 0.3, "nan_granularity": "model"})
    assert norm_group(recipe) == norm_group(same)
    other_norm = family_recipe(family, nan_norm="weights")
    other_models = {**recipe, "models": recipe["models"][:2]}
    per_model = json.loads(json.dumps(recipe))
    per_model["models"][0]["parameters"] = {"nan_exponent": 2.0}
    for different in (other_norm, other_models, {**recipe, "dtype": "bfloat16"}, per_model):
        assert norm_group(different) != norm_group(recipe)


def test_compare_runs_the_norm_pass_once_for_its_nan_candidates(family, tmp_path, norm_passes):
    from support import run_command

    recipe = family_recipe(family)
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "a.txt").write_text("w3 w4 w5 w6\nw7 w8 w9\n")
    weighed = len(inspect_recipe(MergeConfiguration.model_validate(recipe)).tensors)
    norm_passes.clear()
    result = run_command(
        "mergekit-nan", "compare", "recipe.yml", "--data", "a.txt", "--exponent", "-1",
        "--granularity", "layer,model", "--json", "out.json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(norm_passes) == weighed
    shared = [line for line in result.stdout.splitlines() if "norms of an earlier" in line]
    assert [line.split(":")[0] for line in shared] == ["[3/5] nan exponent=-1",
        "[4/5] nan granularity=layer", "[5/5] nan granularity=model"]  # fmt: skip
    data = json.loads((tmp_path / "out.json").read_text())
    assert [c["recipe"] for c in data["candidates"]][0] == recipe
