"""``mergekit-nan merge``: a NAN recipe at any granularity, merged by mergekit itself.

At ``tensor`` granularity the recipe goes straight to mergekit's ``run_merge``
(no extra pass), so the output is bit-identical to ``mergekit-yaml RECIPE``.
At ``layer`` and ``model`` granularity the coefficients need norms pooled over
many tensors: :func:`~mergekit_nan.commands.inspect.measure_recipe` measures every
tensor's norms in one streaming pass (one tensor per input in memory), the
coefficients are frozen into a stock recipe
(:func:`~mergekit_nan.commands.freeze.freeze_recipe`) and ``run_merge`` merges that
recipe with the user's options. The output therefore equals ``mergekit-nan
freeze --granularity X`` followed by the stock ``mergekit-yaml`` on the frozen
recipe. Nothing is written to the output directory before the pass succeeded.
A recipe with LoRA references and no ``lora_merge_cache`` merges the adapters
once into a temporary directory shared by the pass and the merge.

Model card (with ``write_model_card``): mergekit's own card for the recipe as
given (it names NAN and the models) plus a section with the granularity and
the coefficients; ``mergekit_config.yml`` holds the recipe as given and, when
the coefficients were frozen, :data:`FROZEN_FILE` the stock recipe that was
merged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import yaml
from mergekit.card import generate_card
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_nan.commands.freeze import freeze_recipe, frozen_yaml
from mergekit_nan.commands.inspect import Inspection, measure_recipe, require_nan_recipe
from mergekit_nan.commands.report import format_table, write_files
from mergekit_nan.granularity import resolve_granularity, without_granularity
from mergekit_nan.method import NAN_PAPER_URL
from mergekit_nan.parameters import Granularity

__all__ = ["FROZEN_FILE", "MergeResult", "merge_recipe", "nan_card_section"]

FROZEN_FILE = "mergekit_nan_frozen.yml"
"""The stock recipe merged at ``layer``/``model`` granularity, next to the card."""

_POOLING = {
    "tensor": "every tensor's coefficients come from its own norms ||x_i,t||, "
    "computed inside the merge",
    "layer": "one coefficient per model per transformer layer, from the layer's "
    "pooled norms sqrt(sum_t ||x_i,t||^2); embeddings, final norm and lm_head keep "
    "per-tensor coefficients",
    "model": "one coefficient per model, from whole-model norms sqrt(sum_t ||x_i,t||^2)",
}


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_recipe` did.

    ``inspection`` and ``frozen`` (the stock recipe's YAML text) are present
    when the coefficients were measured: at ``layer``/``model`` granularity,
    or at ``tensor`` granularity with ``save_frozen``.
    """

    granularity: Granularity
    inspection: Optional[Inspection]
    frozen: Optional[str]


@contextlib.contextmanager
def _lora_cache(config: MergeConfiguration, options: MergeOptions) -> Iterator[MergeOptions]:
    """``options`` with a temporary LoRA merge cache when the recipe needs one and has none."""
    loras = [m for m in config.referenced_models() if m.lora is not None]
    if not loras or options.lora_merge_cache is not None:
        yield options
        return
    with tempfile.TemporaryDirectory(prefix="mergekit-nan-lora-") as directory:
        try:
            yield options.model_copy(update={"lora_merge_cache": directory})
        finally:
            # mergekit's loader cache outlives the call: forget the merged adapters.
            for model in loras:
                LoaderCache().loaders.pop(model, None)


def nan_card_section(
    config: MergeConfiguration, granularity: Granularity, inspection: Optional[Inspection]
) -> str:
    """Markdown for the model card: NAN, the granularity and the coefficients."""
    lines = [
        "",
        "### NAN coefficients",
        "",
        f"The merge coefficients were estimated with [NAN]({NAN_PAPER_URL}) "
        f"(`merge_method: {config.merge_method}`) by `mergekit-nan merge` at "
        f"**{granularity}** granularity: {_POOLING[granularity]}.",
        "",
    ]
    if inspection is not None:
        lines += ["```text", format_table(inspection), "```", ""]
    else:
        lines += [
            "`mergekit-nan inspect mergekit_config.yml --all` lists them per tensor.",
            "",
        ]
    lines.append(
        "`mergekit_config.yml` is the recipe as given; `mergekit-nan merge` reproduces "
        "this model from it"
        + (f" with `--granularity {granularity}`." if granularity != "tensor" else ".")
    )
    if inspection is not None and granularity != "tensor":
        lines.append(
            f"\n`{FROZEN_FILE}` is the stock mergekit recipe that was merged "
            f"(`{inspection.inner_method}` with these coefficients as `weight` values); "
            "plain `mergekit-yaml` reproduces this model from it."
        )
    return "\n".join(lines) + "\n"


def _write_card(
    out_path: str,
    config: MergeConfiguration,
    source: str,
    result: MergeResult,
) -> None:
    card = generate_card(config=config, config_yaml=source, name=os.path.basename(out_path))
    files = {
        os.path.join(out_path, "README.md"): card
        + nan_card_section(config, result.granularity, result.inspection),
        os.path.join(out_path, "mergekit_config.yml"): source,
    }
    if result.frozen is not None and result.granularity != "tensor":
        files[os.path.join(out_path, FROZEN_FILE)] = result.frozen
    for path, text in files.items():
        Path(path).write_text(text, encoding="utf-8")


def merge_recipe(
    config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    *,
    granularity: Optional[str] = None,
    config_source: Optional[str] = None,
    save_frozen: Optional[str] = None,
    source_name: str = "the recipe",
) -> MergeResult:
    """Merge a ``nan``/``<method>+nan`` recipe at ``granularity`` into ``out_path``.

    ``granularity`` None means the recipe's ``nan_granularity``, else
    ``tensor``. ``config_source`` is the recipe's text (for the model card and
    ``mergekit_config.yml``); ``save_frozen`` a path for the frozen stock
    recipe (measuring the coefficients at ``tensor`` granularity too). Errors
    of the recipe or of the norm pass are raised before anything is written.
    """
    granularity = resolve_granularity(config, granularity)
    require_nan_recipe(config)
    plain = without_granularity(config)
    source = config_source if config_source is not None else config.to_yaml()
    inspection = frozen = None
    with _lora_cache(plain, options) as options:
        if granularity != "tensor" or save_frozen is not None:
            inspection = measure_recipe(plain, granularity, options)
            frozen = frozen_yaml(
                freeze_recipe(inspection), source=source_name, inspection=inspection
            )
        if save_frozen is not None:
            write_files({save_frozen: lambda path: Path(path).write_text(frozen, encoding="utf-8")})
        if granularity == "tensor":
            run_merge(plain, out_path, options=options, config_source=source)
        else:
            merged = MergeConfiguration.model_validate(yaml.safe_load(frozen))
            run_merge(merged, out_path, options=options, config_source=frozen)
    result = MergeResult(granularity=granularity, inspection=inspection, frozen=frozen)
    if options.write_model_card:
        _write_card(out_path, plain, source, result)
    return result
