"""``mergekit-nan merge`` for adapter recipes: LoRA adapters in, one LoRA adapter out.

Per LoRA module the merged update ``sum_i c_i s_i B_i A_i`` (the multipliers
``c_i`` of :mod:`mergekit_nan.commands.adapters.coefficients`) is written as one
module whose rank is the sum of the contributing ranks:
``B = [c_1 s_1 B_1 | ...]``, ``A = [A_1; ...]`` (:func:`mergekit_nan.lora.concatenate`),
with ``lora_alpha = r`` per module so that PEFT's scaling is exactly 1. The base
plus this adapter is then the merge of the ``base+adapter_i`` models to float32
rounding. An adapter that leaves a module alone, or whose update there is zero,
adds no rank to it. ``modules_to_save`` tensors are merged as full tensors
against the base (as NAN merges any tensor) and saved as such. With ``rank``,
every module is cut to that rank (:func:`mergekit_nan.lora.truncate`) and the
fraction of its Frobenius norm it keeps is recorded.

Everything is written into a partial directory that becomes ``out_path`` only
when complete (:func:`~mergekit_nan.commands.common.output.atomic_directory`):
``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (how to
reproduce it, the coefficients and any truncation) and ``mergekit_config.yml``
(the recipe as given).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from safetensors.torch import save_file

from mergekit_nan.commands.adapters.coefficients import (
    TensorUpdate,
    adapter_inspection,
    adapter_updates,
)
from mergekit_nan.commands.common.output import atomic_directory, write_files
from mergekit_nan.commands.inspection.freeze import freeze_recipe, frozen_yaml
from mergekit_nan.commands.inspection.report import format_table
from mergekit_nan.doctor.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    AdapterRecipe,
    adapter_recipe,
)
from mergekit_nan.granularity import resolve_granularity
from mergekit_nan.lora import concatenate, truncate
from mergekit_nan.method import NAN_PAPER_URL, weighted_sum
from mergekit_nan.parameters import Granularity
from mergekit_nan.worker_pool import one_thread

__all__ = ["AdapterMerge", "adapter_merge_or_stock", "merge_adapters", "merged_tensors"]

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterMerge:
    """What :func:`merge_adapters` wrote.

    ``ranks`` maps each LoRA module to its rank in the output; ``retained`` (with
    a ``rank`` cut) to the fraction ``||cut||_F / ||merged||_F`` it keeps;
    ``full`` lists the ``modules_to_save`` tensors; ``written`` counts bytes.
    """

    out_path: Path
    granularity: Granularity
    ranks: Dict[str, int]
    full: Tuple[str, ...]
    written: int
    retained: Dict[str, float] = field(default_factory=dict)

    def lines(self) -> List[str]:
        """What the command prints."""
        total = sum(self.ranks.values())
        lines = [
            f"LoRA adapter: {len(self.ranks)} modules (ranks {min(self.ranks.values(), default=0)}"
            f"-{max(self.ranks.values(), default=0)}, {total} in all)"
            + (f", {len(self.full)} full tensors" if self.full else "")
            + f", {self.written / 1e6:.2f} MB"
        ]
        if self.retained:
            worst = min(self.retained, key=self.retained.__getitem__)
            mean = math.fsum(self.retained.values()) / len(self.retained)
            lines.append(
                f"--rank: modules keep {mean:.4f} of their Frobenius norm on average; "
                f"worst {worst} keeps {self.retained[worst]:.4f} (every module: README.md)"
            )
        return lines


def _output_dtype(config: MergeConfiguration, recipe: AdapterRecipe) -> torch.dtype:
    name = config.out_dtype or config.dtype
    if name:
        return dtype_from_name(name)
    adapter = recipe.adapters[0]
    first = next(iter(adapter.modules), None)
    return adapter.factors(first)[0].dtype if first else torch.float32


def _merged_module(
    recipe: AdapterRecipe, update: TensorUpdate, rank: Optional[int]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
    terms = []
    for adapter, coefficient in zip(recipe.adapters, update.coefficients):
        if update.name in adapter.modules and coefficient != 0:
            b, a = adapter.factors(update.name)
            terms.append((b, a, coefficient * adapter.modules[update.name].scale))
    if not terms:
        # Every update is zero or weighed 0: one zero module, which PEFT loads as no change.
        adapter = next(a for a in recipe.adapters if update.name in a.modules)
        b, a = adapter.factors(update.name)
        terms = [(b, a, 0.0)]
    b, a = concatenate(terms, torch.float64)
    if rank is None:
        return b, a, None
    cut = truncate(b, a, rank)
    return cut.b, cut.a, cut.retained


def _merged_full(recipe: AdapterRecipe, update: TensorUpdate) -> torch.Tensor:
    base = recipe.base_tensor(update.name)
    terms = [
        (adapter.tensor(update.name), coefficient)
        for adapter, coefficient in zip(recipe.adapters, update.coefficients)
        if update.name in adapter.saved and coefficient != 0
    ]
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    result = torch.empty(base.shape, dtype=dtype)
    # theta_b + sum c_i (theta_i - theta_b), as nan writes it.
    weighted_sum(result, [(base, 1.0 - math.fsum(c for _, c in terms))] + terms)
    return result


def merged_tensors(
    config: MergeConfiguration,
    recipe: AdapterRecipe,
    updates: List[TensorUpdate],
    rank: Optional[int] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], Dict[str, float], Tuple[str, ...]]:
    """The merged adapter's tensors (PEFT names), module ranks, retained fractions, full tensors.

    ``updates`` are :func:`~mergekit_nan.commands.adapters.coefficients.adapter_updates`'.
    """
    dtype = _output_dtype(config, recipe)
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    retained: Dict[str, float] = {}
    full = []
    for update in updates:
        if not update.lora:
            tensors[_PREFIX + update.name] = _merged_full(recipe, update).to(dtype)
            full.append(update.name)
            continue
        module = update.name[: -len(".weight")]
        b, a, kept = _merged_module(recipe, update, rank)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[module] = a.shape[0]
        if kept is not None:
            retained[module] = kept
    return tensors, ranks, retained, tuple(full)


def _adapter_config(
    recipe: AdapterRecipe, ranks: Dict[str, int], full: Tuple[str, ...]
) -> Dict[str, object]:
    """A PEFT LoRA config whose scaling is 1 for every module (``lora_alpha = r``)."""
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    odd = {module: r for module, r in ranks.items() if r != common}
    saved = sorted({name.rsplit(".", 1)[0] for name in full})
    tasks = {a.task_type for a in recipe.adapters}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": str(recipe.base),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": {_exact(m): r for m, r in odd.items()},
        "alpha_pattern": {_exact(m): r for m, r in odd.items()},
        "target_modules": sorted(ranks),
        "modules_to_save": saved or None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": tasks.pop() if len(tasks) == 1 else None,
    }


def _exact(module: str) -> str:
    """A rank/alpha pattern key that PEFT matches to this module only."""
    return module.replace(".", r"\.")


def _card(
    config: MergeConfiguration,
    recipe: AdapterRecipe,
    name: str,
    granularity: Granularity,
    rank: Optional[int],
    table: Optional[str],
    retained: Dict[str, float],
) -> str:
    words = [
        "mergekit-nan",
        "merge",
        "mergekit_config.yml",
        "OUT_PATH",
        "--granularity",
        granularity,
    ]
    if rank is not None:
        words += ["--rank", str(rank)]
    adapters = "\n".join(f"- `{a.reference}`" for a in recipe.adapters)
    lines = [
        "---",
        f"base_model: {recipe.base}",
        "library_name: peft",
        "tags: [mergekit, mergekit-nan, lora, merge]",
        "---",
        f"# {name}",
        "",
        f"One LoRA adapter for `{recipe.base}`, merged by `mergekit-nan merge` from the "
        f"adapters below with `merge_method: {config.merge_method}` at **{granularity}** "
        f"granularity ([NAN]({NAN_PAPER_URL}) coefficients from each module's "
        "||s_i B_i A_i||_F, computed from the factors). Applied to the base model, it "
        "equals the merge of the `base+adapter` models.",
        "",
        adapters,
        "",
        "`mergekit_config.yml` is the recipe as given; this reproduces the adapter:",
        "",
        f"```bash\n{shlex.join(words)}\n```",
        "",
    ]
    if table:
        lines += ["### Coefficients", "", "```text", table, "```", ""]
    if retained:
        lines += [
            f"### Truncation to rank {rank}",
            "",
            "| module | fraction of the Frobenius norm kept |",
            "|---|---|",
        ]
        lines += [f"| {module} | {value:.6f} |" for module, value in retained.items()]
        lines.append("")
    return "\n".join(lines)


def adapter_merge_or_stock(
    config: MergeConfiguration, *, rank: Optional[int], full_model: bool
) -> Optional[AdapterRecipe]:
    """``config``'s validated adapter recipe, or None for a recipe of full models.

    ``--rank`` and ``--full-model`` (``rank``, ``full_model``) apply to adapter
    recipes only, and not together.
    """
    recipe = adapter_recipe(config)
    if recipe is None and (rank is not None or full_model):
        raise AdapterError(
            "--rank and --full-model apply to adapter recipes (every model a LoRA "
            "adapter directory); this recipe merges full models"
        )
    if full_model and rank is not None:
        raise AdapterError("--rank cuts the merged adapter's rank; a --full-model merge has none")
    return recipe


def merge_adapters(
    config: MergeConfiguration,
    recipe: AdapterRecipe,
    out_path: str,
    *,
    granularity: Optional[str] = None,
    rank: Optional[int] = None,
    config_source: Optional[str] = None,
    write_model_card: bool = True,
    overwrite: bool = False,
    save_frozen: Optional[str] = None,
    source_name: str = "the recipe",
) -> AdapterMerge:
    """Merge the adapter recipe into one PEFT LoRA adapter at ``out_path``, atomically.

    Everything is computed before the output is touched; ``out_path`` must be
    new or empty unless ``overwrite`` and is left as it was if anything fails.
    ``granularity`` None means the recipe's ``nan_granularity``, else ``tensor``;
    ``save_frozen`` a path for the stock recipe over ``base+adapter`` models
    with the coefficients written out (``source_name`` names the recipe in it).
    """
    granularity = resolve_granularity(config, granularity)
    with one_thread():  # small products and conversions: see mergekit_nan.lora
        measured = adapter_updates(config, recipe, granularity)
        tensors, ranks, retained, full = merged_tensors(config, recipe, measured[0], rank)
    nan = config.merge_method != "task_arithmetic"
    inspection = adapter_inspection(config, recipe, granularity, measured) if nan else None
    if save_frozen is not None:
        if inspection is None:
            raise AdapterError(
                "--save-frozen needs a NAN method: task_arithmetic has no coefficients to freeze"
            )
        frozen = frozen_yaml(freeze_recipe(inspection), source=source_name, inspection=inspection)
        write_files({save_frozen: lambda path: Path(path).write_text(frozen, encoding="utf-8")})
    table = format_table(inspection) if inspection is not None else None
    target = Path(os.path.realpath(os.path.expanduser(out_path)))
    settings = _adapter_config(recipe, ranks, full)
    with atomic_directory(target, overwrite=overwrite) as partial:
        save_file(tensors, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (partial / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        if write_model_card:
            card = _card(config, recipe, target.name, granularity, rank, table, retained)
            (partial / "README.md").write_text(card, encoding="utf-8")
            source = config_source if config_source is not None else config.to_yaml()
            (partial / "mergekit_config.yml").write_text(source, encoding="utf-8")
        written = sum(f.stat().st_size for f in partial.iterdir())
    return AdapterMerge(target, granularity, ranks, full, written, retained)
