"""``mergekit-nan check`` on the family: models not found, the estimate and the disk,
planning and multi-document recipes, the installed command.
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

import pytest
import torch
import yaml
from support import (
    build_recipe,
    report_codes,
    run_command,
    stored_shapes,
    tensor_nbytes,
    write_recipe,
)

from mergekit_nan.doctor.check import check_recipe

# -- expected numbers, from the checkpoints ------------------------------------------------


# -- model not found -----------------------------------------------------------------------


def test_model_not_found_names_model_and_place(family, tmp_path):
    recipe = build_recipe(
        [family[1], tmp_path / "no-such-model", f"{family[2]}+{tmp_path / 'no-such-adapter'}"],
        base=family[0],
        dtype=None,
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
    recipe = build_recipe([family[2]], base=family[0], dtype=None)
    recipe["models"].append({"model": "tiny-org/tiny-ft"})
    from mergekit.options import MergeOptions

    report = check_recipe(recipe, options=MergeOptions(transformers_cache=str(tmp_path / "hub")))
    assert report_codes(report) == []  # found, and planned from the cache
    assert report.estimate.output_tensors == len(stored_shapes(family[0]))
    expected = sum(
        tensor_nbytes(*v)
        for m in (family[0], family[2], family[1])
        for v in stored_shapes(m).values()
    )
    assert report.estimate.read_bytes == expected


# -- estimate and disk ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_estimate_matches_the_checkpoints(family, dtype):
    report = check_recipe(build_recipe(family[1:], base=family[0], dtype=dtype))
    estimate = report.estimate
    tensors = [stored_shapes(m) for m in family]
    assert estimate.read_bytes == sum(tensor_nbytes(*v) for t in tensors for v in t.values())
    assert estimate.read_bytes == sum(
        os.path.getsize(m / "model.safetensors") - 8 - header_length(m) for m in family
    )
    out = torch.bfloat16 if dtype else torch.float32
    base = tensors[0]
    assert estimate.output_tensors == len(base)
    assert estimate.output_bytes == sum(tensor_nbytes(shape, out) for shape, _ in base.values())
    numel = max(math.prod(shape) for shape, _ in base.values())
    name = estimate.largest.name  # embed_tokens and lm_head tie here
    assert math.prod(base[name][0]) == numel and estimate.largest.shape == base[name][0]
    assert estimate.largest.nbytes == tensor_nbytes(base[name][0], out)
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
    recipe = write_recipe(tmp_path / "r.yml", build_recipe(family[1:], base=family[0], dtype=None))
    target = tmp_path / "not" / "yet" / "there"
    probed = []

    def usage(path):
        probed.append(path)
        return Usage(10**9, 10**9 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    free = 10**12
    result = run_command("mergekit-nan", "check", recipe, "--out-path", target)
    assert result.returncode == 0, result.stderr
    assert probed == [str(tmp_path)]  # the nearest existing parent
    report = check_recipe(recipe, out_path=str(target))
    assert report.estimate.free_bytes == free
    output = sum(tensor_nbytes(*v) for v in stored_shapes(family[0]).values())
    free = output - 1
    result = run_command("mergekit-nan", "check", recipe, "--out-path", target)
    assert result.returncode == 1
    assert "error: the merged model needs about" in result.stdout
    (disk,) = [f for f in check_recipe(recipe, out_path=str(target)).errors]
    assert disk.code == "disk-space" and str(target) in disk.message


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
    first = {"name": "first", **build_recipe([family[1], family[2]], base=family[0], dtype=None)}
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
    assert report.estimates[0].output_tensors == len(stored_shapes(family[0]))


def test_installed_command(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", build_recipe(family[1:], base=family[0], dtype=None))
    start = time.perf_counter()
    result = run_command("mergekit-nan", "check", str(recipe), "--json", str(tmp_path / "r.json"))
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2] == "0 errors, 0 warnings"
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == 0
    print(f"mergekit-nan check on the tiny family: {elapsed:.2f} s")


def test_recipe_findings_come_through_once(family, tmp_path):
    from mergekit_nan.doctor.recipe_checks import recipe_findings

    data = build_recipe(family[1:], base=family[0], parameters={"nan_exponet": 2.0}, dtype=None)
    expected = recipe_findings(data)
    assert expected, "the typo should be a finding of the recipe"
    result = run_command("mergekit-nan", "check", write_recipe(tmp_path / "r.yml", data))
    assert result.returncode == 0
    report = check_recipe(data)
    assert [f for f in report.findings if f.code != "estimate"] == expected
    for finding in expected:
        assert result.stdout.count(finding.line()) == 1
    assert result.stderr == ""  # the stock-command guard stays out of check's own planning
