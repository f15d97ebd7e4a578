"""``mergekit-nan demo``: a complete NAN merge on tiny local checkpoints, offline.

Builds a seeded tiny Llama family (a base and three fine-tunes whose task
vectors have standard deviations 0.01, 0.02 and 0.04), writes a ``nan``
recipe, merges it with mergekit's own ``run_merge`` and reports the
coefficients the merge used together with an independent check of the merged
tensors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml

from mergekit_nan.commands.inspection.report import format_table

__all__ = ["DEMO_SCALES", "DemoResult", "demo_recipe", "run_demo"]

DEMO_SCALES = (0.01, 0.02, 0.04)
"""Task-vector standard deviations of the demo's three fine-tunes."""

_SHOWN = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "lm_head.weight",
)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote things (``None`` once removed) and what it checked."""

    root: Optional[Path]
    recipe: Optional[Path]
    merged: Optional[Path]
    table: str
    max_error: float


def demo_recipe(paths: List[Path]) -> Dict:
    """The demo's ``nan`` recipe for ``[base, ft0, ft1, ...]``."""
    base, *tuned = paths
    return {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(path)} for path in tuned],
    }


def _safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _max_error(inspection, paths: List[Path], merged: Path) -> float:
    """max |merged - (base + lambda sum alpha_i (theta_i - base))| in float64."""
    base, *tuned = (_safetensors(path) for path in paths)
    result = _safetensors(merged)
    error = 0.0
    for tensor in inspection.tensors:
        expected = base[tensor.name].double()
        for alpha, model in zip(tensor.weights, tuned):
            expected = expected + tensor.scale * alpha * (
                model[tensor.name].double() - base[tensor.name].double()
            )
        difference = (result[tensor.name].double() - expected).abs().max().item()
        error = max(error, difference)
    return error


def _next_command(recipe: Path) -> str:
    """The follow-up to suggest: a heatmap only where matplotlib (the ``plot`` extra) is installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return f"mergekit-nan inspect {recipe} --plot heatmap.png"
    return (
        f"mergekit-nan inspect {recipe} --csv coefficients.csv "
        "(for a heatmap: pip install 'mergekit-nan[plot]', then add --plot heatmap.png)"
    )


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_demo(
    out: Optional[Path] = None,
    *,
    keep: bool = False,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo in ``out`` (must be empty or new) or a temporary directory.

    A temporary directory is removed at the end unless ``keep``; ``out`` is
    always kept. Prints through ``echo``.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_nan.commands.inspection.coefficient_pass import inspect_recipe
    from mergekit_nan.commands.tiny import write_family
    from mergekit_nan.registration import register_methods

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if out is not None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo output directory {out} is not empty")
    root = Path(tempfile.mkdtemp(prefix="mergekit-nan-demo-")) if out is None else out
    removable = out is None and not keep
    try:
        _quiet_transformers()
        register_methods()
        root.mkdir(parents=True, exist_ok=True)
        echo(
            f"Writing a tiny base model and {len(DEMO_SCALES)} fine-tunes "
            f"(task vector std {', '.join(map(str, DEMO_SCALES))}) ..."
        )
        paths = write_family(root / "models", DEMO_SCALES, seed=0)
        recipe = demo_recipe(paths)
        recipe_path = root / "nan.yml"
        text = yaml.safe_dump(recipe, sort_keys=False)
        recipe_path.write_text(text, encoding="utf-8")
        merged = root / "merged"
        echo("Merging with mergekit (merge_method: nan) ...")
        options = MergeOptions(quiet=True)
        run_merge(MergeConfiguration.model_validate(recipe), str(merged), options, text)
        inspection = inspect_recipe(MergeConfiguration.model_validate(recipe), options=options)
        shown = tuple(t for t in inspection.tensors if t.name in _SHOWN)
        table = format_table(replace(inspection, tensors=shown), all_tensors=True)
        error = _max_error(inspection, paths, merged)
        echo("")
        echo(table)
        echo("")
        echo("The smallest task vector gets the largest coefficient (alpha ~ 1/||delta||).")
        echo(
            f"Check: max |merged - (base + lambda * sum alpha_i delta_i)| = {error:.1e} "
            f"over all {len(inspection.tensors)} tensors."
        )
        if removable:
            echo("Merged model removed (pass --keep or --out DIR to keep it).")
            return DemoResult(None, None, None, table, error)
        echo(f"Merged model: {merged}")
        echo(f"Recipe:       {recipe_path}")
        echo(f"Next: {_next_command(recipe_path)}")
        return DemoResult(root, recipe_path, merged, table, error)
    finally:
        if removable:
            shutil.rmtree(root, ignore_errors=True)
