"""The merges that mergekit runs: recipes over saved backbones, through ``mergekit-pytorch``.

mergekit 0.1.5's ``mergekit-yaml`` planner fails on BERT, so every merge here runs the
stock ``mergekit-pytorch`` command (each model one ``.safetensors`` file) in this process,
through its installed console-script entry point, with the plugin registered (importing
``mergekit_nan``). Each recipe is merged once, at ``lambda = 1``, with every per-model
weight summing to one; the merged task vector ``M = merged - base`` is then scaled by each
``lambda`` of the grid in this process (``lambda`` is a final scale in every method here).

* ``task_arithmetic`` with weights 1/T (uniform), ``volume_i / sum`` (the data-volume
  oracle), MMCR's weights, or NAN's coefficients pooled per layer or per model (per-tensor
  weights as conditional ``filter`` entries: ``mergekit-nan merge --granularity`` cannot
  plan BERT either, so the benchmark computes the pooled coefficients with the plugin's
  ``coefficients_from_norms`` and freezes them into the recipe, as ``mergekit-nan freeze``
  would);
* ``nan`` (per tensor, p = 1): the plugin's method;
* ``ties`` (weights 1/T) and ``ties+nan`` (NAN's weights), ``density`` of the size.

:func:`deviation` compares a linear merge with ``sum_i w_i x_i`` recomputed in float64.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import yaml
from safetensors.torch import load_file, save_file

import mergekit_nan  # noqa: F401  (registers nan and the +nan methods with mergekit)

State = Dict[str, torch.Tensor]
Weight = Union[float, List[Dict[str, object]]]


def save(state: State, path: Path, frozen: Sequence[str] = ()) -> Path:
    """Save ``state`` without the ``frozen`` tensors (those no expert trains, whose task
    vectors are zero in every model: leaving them out of every file leaves the merge of the
    others unchanged and spares mergekit 46 MB of word embeddings per model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous() for n, t in state.items() if n not in frozen}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def conditional(groups: Dict[str, List[float]], index: int) -> Weight:
    """Model ``index``'s weight as mergekit conditional entries, one per group of tensors
    (a layer prefix such as ``encoder.layer.3.`` or a tensor's full name; ``*``: all)."""
    if set(groups) == {"*"}:
        return float(groups["*"][index])
    return [{"filter": group, "value": float(values[index])} for group, values in groups.items()]


@dataclass(frozen=True)
class Recipe:
    merge_method: str
    weights: Optional[List[Weight]] = None
    density: Optional[float] = None

    def config(self, base: Path, experts: Sequence[Path]) -> Dict[str, object]:
        models = []
        for index, path in enumerate(experts):
            parameters: Dict[str, object] = {}
            if self.weights is not None:
                parameters["weight"] = self.weights[index]
            if self.density is not None:
                parameters["density"] = self.density
            entry: Dict[str, object] = {"model": str(path)}
            if parameters:
                entry["parameters"] = parameters
            models.append(entry)
        return {
            "merge_method": self.merge_method,
            "base_model": str(base),
            "dtype": "float32",
            "parameters": {"lambda": 1.0},
            "models": models,
        }


class Merger:
    """Runs ``mergekit-pytorch`` in this process; returns the merged task vector."""

    def __init__(self) -> None:
        (script,) = entry_points(group="console_scripts", name="mergekit-pytorch")
        self._main = script.load()
        self._bases: Dict[Path, State] = {}
        """Each base's tensors, read once (every merge subtracts them)."""
        self.calls = 0

    def merge(
        self, recipe: Recipe, base: Path, experts: Sequence[Path], work: Path, seed: int
    ) -> State:
        from mergekit.io.tasks import LoaderCache

        work.mkdir(parents=True, exist_ok=True)
        config, out = work / "recipe.yml", work / "merged"
        config.write_text(yaml.safe_dump(recipe.config(base, experts), sort_keys=False))
        arguments = [str(config), str(out), "--quiet", "--random-seed", str(seed)]
        try:
            echo = io.StringIO()
            with contextlib.redirect_stdout(echo), contextlib.redirect_stderr(echo):
                self._main.main(args=arguments, prog_name="mergekit-pytorch", standalone_mode=False)
            merged: State = {}
            for shard in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(shard)))
        finally:
            LoaderCache().flush_all()
            LoaderCache().loaders.clear()
            shutil.rmtree(out, ignore_errors=True)
        self.calls += 1
        if base not in self._bases:
            self._bases[base] = load_file(str(base))
        reference = self._bases[base]
        return {
            n: merged[n].double() - reference[n].double()
            for n in reference
            if reference[n].is_floating_point()
        }


def deviation(merged: State, expected: State, base: State) -> float:
    """How far mergekit's merged weights are from ``base + expected`` (the task vector
    recomputed in float64): the largest ``|merged - expected|`` of a tensor over the largest
    ``|base + expected|`` of that tensor (float32 storage gives about 1e-7), over every
    tensor; tensors missing from the merge count as zero task vectors."""
    worst = 0.0
    for name, tensor in expected.items():
        got = merged.get(name, torch.zeros_like(tensor))
        scale = float((base[name].double() + tensor).abs().max())
        worst = max(worst, float((got - tensor).abs().max()) / max(scale, 1e-30))
    return worst
