"""A corpus of bad NAN recipes through the stock ``mergekit-yaml``: nothing silent, nothing wrong.

For every mistake a hurried user makes, the stock command either refuses
with one readable message (exit 1, no traceback, no output directory left,
the last line naming the parameter, model or tensor) or merges and says what
it noticed (a warning naming the parameter). ``mergekit-nan check`` reports
each mistake once, in the plugin's words.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import yaml
from safetensors.torch import load_file, save_file
from support import build_recipe, run_command, write_recipe

from mergekit_nan.commands.tiny import tiny_llama_config, write_family


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    """A tiny family, a fine-tune with one NaN, and a model of twice the width."""
    root = tmp_path_factory.mktemp("corpus")
    base, *tuned = write_family(root / "family", (0.01, 0.02, 0.04), seed=2)
    nan = root / "with-nan"
    shutil.copytree(tuned[0], nan)
    state = load_file(nan / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    config = tiny_llama_config(hidden_size=64)
    (wide,) = write_family(root / "wide", (), seed=3, config=config)
    found = {"base": base, "with-nan": nan, "wide": wide}
    found.update({f"ft{i}": path for i, path in enumerate(tuned)})
    return found


def corpus_recipe(models: Dict[str, Path], method: str = "nan", **extra) -> Dict:
    """``method`` over ft0-ft2 of the corpus, with its base (``extra``: as ``build_recipe``)."""
    tuned = [models[f"ft{i}"] for i in range(3)]
    return build_recipe(tuned, method, base=models["base"], **extra)


def weighted(models, method: str, weights: List, **extra) -> Dict:
    return corpus_recipe(models, method, weights=weights, **extra)


Case = Callable[[Dict[str, Path]], object]
REFUSED: Dict[str, tuple] = {
    # case: (recipe or recipe text, words of the last line)
    "typo in the method": (lambda m: corpus_recipe(m, "tie+nan"), "merge_method"),
    "method without weights": (lambda m: corpus_recipe(m, "slerp+nan"), "'slerp' declares no"),
    "zero weight total": (
        lambda m: weighted(m, "ties+nan", [1.0, -1.0, 0.0], parameters={"density": 0.5}),
        "sum to 0",
    ),
    "weights on some models": (lambda m: weighted(m, "ties+nan", [1.0, None, 1.0]), "weight"),
    "all priors zero": (lambda m: weighted(m, "nan", [0.0, 0.0, 0.0]), "every weight on nan is 0"),
    "negative prior": (lambda m: weighted(m, "nan", [1.0, -1.0, 1.0]), "weight = -1"),
    "overflowing lambda": (lambda m: corpus_recipe(m, parameters={"lambda": 1.0e300}), "lambda"),
    "lambda beyond bfloat16": (
        lambda m: corpus_recipe(m, parameters={"lambda": 1.0e39}, dtype="bfloat16"),
        "overflows bfloat16",
    ),
    "NaN lambda": (lambda m: corpus_recipe(m, parameters={"lambda": float("nan")}), "lambda"),
    "exponent not a number": (
        lambda m: corpus_recipe(m, parameters={"nan_exponent": "abc"}),
        "nan_exponent must be a number",
    ),
    "unknown nan_norm": (lambda m: corpus_recipe(m, parameters={"nan_norm": "deltas"}), "nan_norm"),
    "delta without a base": (
        lambda m: {**corpus_recipe(m, parameters={"nan_norm": "delta"}), "base_model": None},
        "base",
    ),
    "pooled granularity": (
        lambda m: corpus_recipe(m, parameters={"nan_granularity": "layer"}),
        "mergekit-nan merge",
    ),
    "one model": (
        lambda m: {**corpus_recipe(m), "base_model": None, "models": [{"model": str(m["ft0"])}]},
        "nan merges at least 2 models",
    ),
    "missing model": (
        lambda m: {**corpus_recipe(m), "models": [{"model": str(m["ft0"]) + "-gone"}]},
        "-gone not found",
    ),
    "missing relative path": (
        lambda m: {
            **corpus_recipe(m),
            "models": [{"model": "./models/ft9"}, {"model": str(m["ft1"])}],
        },
        "./models/ft9 not found",
    ),
    "wider layers": (
        lambda m: {
            **corpus_recipe(m),
            "models": [{"model": str(m["wide"])}, {"model": str(m["ft1"])}],
        },
        "differ in shape",
    ),
    "not a recipe": (lambda m: "merge_method: nan\nmodels: 5\n", "not a valid mergekit recipe"),
    "YAML error": (lambda m: "merge_method: nan\nmodels:\n  - model: [a\n", "not valid YAML"),
    "two documents": (
        lambda m: yaml.safe_dump_all([corpus_recipe(m), corpus_recipe(m)]),
        "run it with mergekit-multi",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_mistake_visible_before_merging_is_refused_cleanly(case, models, tmp_path):
    build, words = REFUSED[case]
    path = write_recipe(tmp_path / "recipe.yml", build(models))
    out = tmp_path / "merged"
    result = run_command("mergekit-yaml", str(path), str(out), "--no-copy-tokenizer")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("Error: ") for line in lines)
    assert words in lines[-1], lines[-1]
    assert not out.exists()


def test_a_nan_in_a_checkpoint_stops_the_merge_naming_tensor_and_model(models, tmp_path):
    config = {**corpus_recipe(models), "models": [{"model": str(models["with-nan"])}]}
    path = write_recipe(tmp_path / "recipe.yml", config)
    out = tmp_path / "merged"
    result = run_command("mergekit-yaml", str(path), str(out), "--no-copy-tokenizer")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "'model.norm.weight'" in last
    assert str(models["with-nan"]) in last and "was removed" in last
    assert not out.exists()  # the unfinished new directory is gone


WARNED: Dict[str, tuple] = {
    # case: (recipe, words of the warning)
    "typo in a parameter": (
        lambda m: corpus_recipe(m, parameters={"nan_exponet": 2.0}),
        "did you mean `nan_exponent`?",
    ),
    "extreme lambda": (
        lambda m: corpus_recipe(m, parameters={"lambda": 1.0e38}, dtype="bfloat16"),
        "extrapolates the task vectors 1e+38 times",
    ),
    "extreme weight total": (
        lambda m: weighted(m, "task_arithmetic+nan", [20.0, 20.0, 20.0]),
        "sum to 60, which extrapolates the task vectors 60 times",
    ),
    "negative total": (
        lambda m: weighted(m, "task_arithmetic+nan", [-1.0, -1.0, -1.0]),
        "weight = -1",
    ),
    "forgotten +nan": (
        lambda m: weighted(
            m, "ties", [1.0, 1.0, 1.0], parameters={"nan_exponent": 2.0, "density": 0.5}
        ),
        "did you mean `ties+nan`?",
    ),
}


@pytest.mark.parametrize("case", list(WARNED))
def test_a_doubtful_recipe_merges_with_a_warning(case, models, tmp_path):
    build, words = WARNED[case]
    path = write_recipe(tmp_path / "recipe.yml", build(models))
    out = tmp_path / "merged"
    result = run_command("mergekit-yaml", str(path), str(out), "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    warnings = [x for x in result.stderr.splitlines() if x.startswith("WARNING:mergekit_nan:")]
    assert any(words in x for x in warnings), result.stderr
    assert len(warnings) == len(set(warnings))  # each said once
    assert (out / "config.json").exists()


@pytest.mark.parametrize("case", ["exponent not a number", "unknown nan_norm", "one model"])
def test_check_says_each_mistake_once_in_its_own_words(case, models, tmp_path):
    build, words = REFUSED[case]
    path = write_recipe(tmp_path / "recipe.yml", build(models))
    result = run_command("mergekit-nan", "check", str(path))
    errors = [x for x in result.stdout.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], result.stdout
    assert "cannot plan" not in result.stdout and "pydantic" not in result.stdout
    assert "Input should be" not in result.stdout and "[type=" not in result.stdout
