"""Compatibility matrix: architectures x methods x dtypes through the stock ``mergekit-yaml``.

Seven architectures (``compat_models.ARCHITECTURES``) each merge with ``nan``,
``ties+nan`` and ``dare_ties+nan``; the dtypes rotate over the cells (a Latin
square), so every architecture runs in float32, bfloat16 and float16 and every
method in every dtype. Inputs are stored in the cell's dtype. Every output
tensor is compared with an independent computation:

- ``nan``: the float64 formula (``support.nan_merge``) on the inputs
  upcast to float64. The plugin computes in float32 and rounds to the output
  dtype once, so the admissible error is that rounding: 1e-6 in float32 (a few
  float32 ulps), ``finfo(dtype).eps`` in half precision (twice the bound of
  one final rounding, eps / 2, relative to the tensor's largest entry).
- ``ties+nan``: stock ``ties`` on the same inputs given float64 NAN weights
  (``support.nan_weights``). Stock ties computes in the input dtype, so
  the reference does too; the composite's coefficients are float32, so the
  admissible error is a weight differing in its last bit: 2e-6 in float32,
  ``finfo(dtype).eps`` in half precision.
- ``dare_ties+nan`` with ``--random-seed``: stock ``dare_ties`` merged in this
  process with the same seed and float64 NAN weights given per tensor through
  filters; the DARE masks must be identical. Same tolerances as ties.

Each cell records and prints its max relative error (``pytest -s``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from compat_models import ARCHITECTURES, Family
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from support import (
    build_recipe,
    load_model_tensors,
    nan_merge,
    nan_weights,
    relative_error,
    report,
    run_mergekit_yaml,
)

METHODS = ("nan", "ties+nan", "dare_ties+nan")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DENSITY = 0.5
SEED = 7


@dataclass(frozen=True)
class Cell:
    arch: str
    method: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.arch}-{self.method}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tolerance(self) -> float:
        if self.dtype != "float32":
            return torch.finfo(self.torch_dtype).eps
        return 1e-6 if self.method == "nan" else 2e-6


CELLS = [
    Cell(arch, method, list(DTYPES)[(i + j) % len(DTYPES)])
    for i, arch in enumerate(ARCHITECTURES)
    for j, method in enumerate(METHODS)
]


def cell_recipe(method: str, family: Family, dtype: str, weights=None) -> Dict:
    """``method`` on the family; ``weights[i]`` is fine-tune i's ``weight`` setting."""
    parameters = {} if method == "nan" else {"density": DENSITY}
    return build_recipe(
        family.tuned, method, base=family.base, weights=weights, parameters=parameters, dtype=dtype
    )


def seed_arguments(method: str) -> List[str]:
    return ["--random-seed", str(SEED)] if method.startswith("dare") else []


def stock_dare_ties(family: Family, dtype: str, out: Path) -> Dict[str, torch.Tensor]:
    """Stock dare_ties in this process, same seed, float64 NAN weights set per tensor."""
    base, *tuned = (load_model_tensors(p) for p in family.paths)
    names = sorted(base)
    # a filter matches by substring: no tensor name may contain another
    assert not [a for a in names for b in names if a != b and a in b]
    settings: List[list] = [[] for _ in tuned]
    for name in names:
        for setting, weight in zip(settings, nan_weights([m[name] for m in tuned], base[name])):
            setting.append({"filter": name, "value": weight})
    config = MergeConfiguration.model_validate(cell_recipe("dare_ties", family, dtype, settings))
    options = MergeOptions(
        random_seed=SEED, copy_tokenizer=False, write_model_card=False, quiet=True
    )
    run_merge(config, str(out), options=options)
    return load_model_tensors(out)


def expected_tensors(cell: Cell, family: Family, out: Path) -> Dict[str, torch.Tensor]:
    base, *tuned = (load_model_tensors(p) for p in family.paths)
    if cell.method == "dare_ties+nan":
        return stock_dare_ties(family, cell.dtype, out)
    expected = {}
    for name, tensor in base.items():
        others = [m[name] for m in tuned]
        if cell.method == "nan":
            expected[name] = nan_merge(others, tensor)
        else:
            expected[name] = merge_tensors(
                [tensor, *others],
                "ties",
                base_index=0,
                parameters={"weight": nan_weights(others, tensor), "density": DENSITY},
            )
    return expected


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_matrix_cell(cell, tiny_families, tmp_path, record_property):
    family = tiny_families.get(cell.arch, cell.torch_dtype)
    out = tmp_path / str(cell)
    run_mergekit_yaml(
        cell_recipe(cell.method, family, cell.dtype), out, *seed_arguments(cell.method)
    )
    merged = load_model_tensors(out)
    base = load_model_tensors(family.base)
    # exactly the checkpoint's tensors: tied models get no lm_head
    assert set(merged) == set(base)
    assert {t.dtype for t in merged.values()} == {cell.torch_dtype}
    config = json.loads((out / "config.json").read_text())
    source = json.loads((family.base / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert config["tie_word_embeddings"] == source["tie_word_embeddings"]
    assert ("lm_head.weight" in merged) == (not source["tie_word_embeddings"])
    assert config["dtype"] == cell.dtype

    expected = expected_tensors(cell, family, tmp_path / "stock")
    if cell.method == "dare_ties+nan":
        moved = {name: tensor != base[name] for name, tensor in merged.items()}
        for name, mask in moved.items():
            assert torch.equal(mask, expected[name] != base[name]), (
                f"different DARE masks in {name}"
            )
        # DARE did drop: an entry stays at the base when all three deltas are dropped (1/8)
        total = sum(mask.numel() for mask in moved.values())
        assert 0.05 < 1 - sum(int(mask.sum()) for mask in moved.values()) / total < 0.3
    errors = {name: relative_error(tensor, expected[name]) for name, tensor in merged.items()}
    worst = max(errors, key=errors.get)
    report(f"{cell} ({len(merged)} tensors, worst {worst})", errors[worst], record_property)
    assert errors[worst] < cell.tolerance, worst
