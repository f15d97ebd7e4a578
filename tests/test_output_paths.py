"""Outputs never overwrite inputs: an output path over an input is refused by every command.

For each kind of input (base model, fine-tune, LoRA adapter, tokenizer source,
a Hugging Face cache snapshot, a stage of a ``mergekit-multi`` file) and each
way of pointing at it (the same directory, inside it, around it, through a
symlink, through ``~``), ``mergekit-nan check --out-path`` reports
``output-overwrites-input``, ``mergekit-nan merge`` refuses before reading a
tensor, and the stock ``mergekit-yaml``/``mergekit-multi`` refuse a NAN recipe
before creating anything. Every input stays byte-identical.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import yaml
from support import build_recipe, run_command, snapshot, write_recipe

from mergekit_nan.commands.tiny import write_family


@dataclass(frozen=True)
class Inputs:
    root: Path
    base: Path
    tuned: List[Path]
    adapter: Path
    tokenizer: Path
    hub: Path
    snapshot: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    """A family of its own (these tests point outputs at it), an adapter, a tokenizer, a hub cache."""
    root = tmp_path_factory.mktemp("inputs")
    base, *tuned = write_family(root / "family", (0.01, 0.02), seed=5)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    tokenizer = root / "tokenizer"
    shutil.copytree(base, tokenizer)
    hub = root / "hub"
    repository = hub / "models--someone--tiny"
    snapshot_dir = repository / "snapshots" / ("0" * 40)
    shutil.copytree(tuned[1], snapshot_dir)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0" * 40)
    return Inputs(root, base, tuned, adapter, tokenizer, hub, snapshot_dir)


def inputs_recipe(inputs: Inputs, method: str = "nan", **extra) -> Dict:
    return build_recipe(inputs.tuned, method, base=inputs.base, **extra)


def with_adapter(inputs: Inputs) -> Dict:
    config = inputs_recipe(inputs)
    config["models"][0]["model"] = f"{inputs.tuned[0]}+{inputs.adapter}"
    return config


def with_hub_model(inputs: Inputs) -> Dict:
    config = inputs_recipe(inputs)
    config["models"][1]["model"] = "someone/tiny"
    return config


def tilde(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HOME", str(inputs.root / "family"))
    return "~/" + inputs.tuned[0].name


def symlink(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> str:
    link = inputs.root / "link-to-ft1"
    if not link.exists():
        link.symlink_to(inputs.tuned[1], target_is_directory=True)
    return str(link)


CASES: Dict[str, tuple] = {
    # case: (recipe, output path, the input the message must name)
    "base model": (inputs_recipe, lambda i, m: str(i.base), lambda i: i.base),
    "fine-tune": (inputs_recipe, lambda i, m: str(i.tuned[1]), lambda i: i.tuned[1]),
    "inside a model": (
        inputs_recipe,
        lambda i, m: str(i.tuned[0] / "merged"),
        lambda i: i.tuned[0],
    ),
    "around the models": (inputs_recipe, lambda i, m: str(i.root / "family"), lambda i: i.base),
    "through a symlink": (inputs_recipe, symlink, lambda i: i.tuned[1]),
    "through ~": (inputs_recipe, tilde, lambda i: i.tuned[0]),
    "LoRA adapter": (with_adapter, lambda i, m: str(i.adapter), lambda i: i.adapter),
    "tokenizer source": (
        lambda i: inputs_recipe(i, tokenizer_source=str(i.tokenizer)),
        lambda i, m: str(i.tokenizer),
        lambda i: i.tokenizer,
    ),
    "hub cache snapshot": (
        with_hub_model,
        lambda i, m: str(i.snapshot),
        lambda i: "someone/tiny",
    ),
}


def run(command: str, inputs: Inputs, config: Dict, out: str, tmp_path: Path):
    path = write_recipe(tmp_path / "recipe.yml", config)
    cache = ["--transformers-cache", str(inputs.hub)]
    if command == "check":
        return run_command("mergekit-nan", "check", str(path), "--out-path", out, *cache)
    common = ["--no-copy-tokenizer", *cache]
    if command == "merge":
        return run_command("mergekit-nan", "merge", str(path), out, *common)
    return run_command("mergekit-yaml", str(path), out, *common)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fails the test if any tensor is read (the refusal must come before)."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the refusal")

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", refuse)


@pytest.mark.parametrize("command", ["check", "merge", "mergekit-yaml"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_output_over_an_input_is_refused(
    case, command, inputs, tmp_path, monkeypatch, no_tensor_reads
):
    build, out_for, named = CASES[case]
    out = out_for(inputs, monkeypatch)
    existed = Path(out).expanduser().exists()
    before = snapshot(inputs.root)
    result = run(command, inputs, build(inputs), out, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout if command == "check" else result.stderr
    assert "Traceback" not in result.stderr
    lines = [x.strip() for x in text.splitlines() if "output directory" in x and "input" in x]
    assert any(str(named(inputs)) in line and out in line for line in lines), text
    if command == "check":
        assert all(line.startswith("error: ") and "fix:" in line for line in lines)
    else:  # the last line the user sees names the input
        assert text.strip().splitlines()[-1].strip() in lines
    assert snapshot(inputs.root) == before
    assert Path(out).expanduser().exists() == existed


def test_check_refuses_it_for_a_recipe_without_nan(inputs, tmp_path):
    config = inputs_recipe(inputs, "linear")
    for model in config["models"]:
        model["parameters"] = {"weight": 1.0}
    result = run("check", inputs, config, str(inputs.tuned[0]), tmp_path)
    assert (
        result.returncode == 1 and "error: models[0].model: the output directory" in result.stdout
    )


def _multi(inputs: Inputs, tmp_path: Path, out: Path, extra: Callable[[Dict], None]) -> Path:
    stage = {"name": "first", **inputs_recipe(inputs)}
    final = inputs_recipe(inputs)
    final["models"] = [{"model": "first"}, {"model": str(inputs.tuned[1])}]
    extra(final)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([stage, final]))
    return path


@pytest.mark.parametrize("where", ["an input of the first stage", "the first stage's output"])
def test_mergekit_multi_refuses_before_any_stage_runs(inputs, tmp_path, where, no_tensor_reads):
    stages = tmp_path / "stages"
    out = inputs.tuned[0] if where.startswith("an input") else stages
    path = _multi(inputs, tmp_path, out, lambda final: None)
    before = snapshot(inputs.root)
    result = run_command(
        "mergekit-multi",
        str(path),
        "--intermediate-dir",
        str(stages),
        "--out-path",
        str(out),
        "--no-copy-tokenizer",
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "output directory" in last and str(out) in last and "Traceback" not in result.stderr
    assert snapshot(inputs.root) == before
    assert not (stages / "first").exists()


def test_check_names_the_multi_stage_whose_input_is_overwritten(inputs, tmp_path):
    path = _multi(inputs, tmp_path, inputs.base, lambda final: None)
    result = run_command("mergekit-nan", "check", str(path), "--out-path", str(inputs.base))
    assert result.returncode == 1
    lines = [
        x
        for x in result.stdout.splitlines()
        if "output-overwrites-input" in x or "output directory" in x
    ]
    assert any(x.startswith("error: first:base_model:") for x in lines), result.stdout
    assert any(x.startswith("error: final:base_model:") for x in lines), result.stdout


def test_a_model_in_the_output_directory_is_a_warning(inputs, tmp_path):
    out = tmp_path / "earlier"
    shutil.copytree(inputs.tuned[0], out)
    result = run("check", inputs, inputs_recipe(inputs), str(out), tmp_path)
    assert result.returncode == 0
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("warning: ")]
    assert "already holds a model (config.json, " in line and "model.safetensors" in line
    assert "--overwrite" in line
