"""``mergekit-nan merge``: a NAN recipe at any granularity, merged by mergekit itself.

At ``tensor`` granularity the recipe goes straight to mergekit's ``run_merge``
(no extra pass), so the output is bit-identical to ``mergekit-yaml RECIPE``.
At ``layer`` and ``model`` granularity the coefficients need norms pooled over
many tensors: :func:`~mergekit_nan.commands.inspection.coefficient_pass.measure_recipe` measures every
tensor's norms in one streaming pass (one tensor per input in memory), the
coefficients are frozen into a stock recipe
(:func:`~mergekit_nan.commands.inspection.freeze.freeze_recipe`) and ``run_merge`` merges that
recipe with the user's options. The output therefore equals ``mergekit-nan
freeze --granularity X`` followed by the stock ``mergekit-yaml`` on the frozen
recipe. Nothing is written to the output directory before the pass succeeded.
A recipe with LoRA references and no ``lora_merge_cache`` merges the adapters
once into a temporary directory shared by the pass and the merge.

Everything is written into a partial directory beside ``out_path`` that
replaces it only once mergekit has written the tensors, the config, the
tokenizer and the model card (:mod:`mergekit_nan.commands.common.output`): an
interrupted or failed merge leaves ``out_path`` as it was. The model card
(with ``write_model_card``) is :mod:`mergekit_nan.commands.merge.card`'s.

A recipe without NAN (any stock method) is merged by ``run_merge`` as given,
through the same partial directory: its tensors and config are bit-identical
to the stock ``mergekit-yaml`` with the same options; only the model card
says which command made it. ``granularity`` and ``save_frozen`` are NAN's
and refused for such a recipe.

Every merged tensor is checked for NaN/Inf values as it is written
(:func:`finite_outputs`): a merge that produces one stops, naming the tensor,
and leaves ``out_path`` as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_nan.commands.common.output import atomic_directory, write_files
from mergekit_nan.commands.inspection.coefficient_pass import Inspection, measure_recipe
from mergekit_nan.commands.inspection.freeze import freeze_recipe, frozen_yaml
from mergekit_nan.commands.inspection.premise import premise, recorded_premise
from mergekit_nan.commands.merge.card import card_files, stock_card_files, write_card_files
from mergekit_nan.errors import TensorError
from mergekit_nan.granularity import resolve_granularity, without_granularity
from mergekit_nan.measure import recording
from mergekit_nan.mergekit_compat import checking_saved_tensors
from mergekit_nan.parameters import Granularity
from mergekit_nan.recipe import check_models, require_nan_recipe, uses_nan

__all__ = ["MergeResult", "finite_outputs", "merge_recipe"]


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_recipe` did.

    ``granularity`` is None for a recipe without NAN. ``inspection`` and
    ``frozen`` (the stock recipe's YAML text) are present when the
    coefficients were measured: at ``layer``/``model`` granularity, or at
    ``tensor`` granularity with ``save_frozen``. ``out_path`` is where the
    model now is (symlinks resolved).
    """

    granularity: Optional[Granularity]
    inspection: Optional[Inspection]
    frozen: Optional[str]
    out_path: Path


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


@contextlib.contextmanager
def _writing(
    target: Path, config: MergeConfiguration, options: MergeOptions, overwrite: bool
) -> Iterator[Tuple[Path, MergeOptions]]:
    """The partial directory to merge into and the options to merge with.

    Around the block: the atomic output directory, a temporary LoRA cache
    where the recipe needs one, and the NaN/Inf check of every merged tensor.
    """
    with (
        atomic_directory(target, overwrite=overwrite) as partial,
        _lora_cache(config, options) as options,
        finite_outputs(),
    ):
        yield partial, options


@contextlib.contextmanager
def finite_outputs() -> Iterator[None]:
    """Inside the block, mergekit's writer refuses a merged tensor with NaN or Inf values.

    :class:`~mergekit_nan.errors.TensorError` names the tensor; it is raised
    before the tensor reaches a shard, so a caller writing into a partial
    directory discards it whole.
    """
    with checking_saved_tensors(_refuse_non_finite):
        yield


def _refuse_non_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise TensorError(
            f"merged tensor {name!r} has {bad} NaN/Inf values of {tensor.numel()}: an "
            "input holds NaN/Inf there, or the recipe divides by zero or overflows the "
            "dtype (mergekit-nan check RECIPE looks for the recipe's part)"
        )


def _refuse_nan_options(
    config: MergeConfiguration, granularity: Optional[str], save_frozen: Optional[str]
) -> None:
    for given, option in ((granularity, "--granularity"), (save_frozen, "--save-frozen")):
        if given is not None:
            raise ValueError(
                f"{option} applies only to NAN recipes, and this recipe's merge_method is "
                f"{config.merge_method!r}; drop {option} (NAN coefficients need "
                "merge_method nan or <method>+nan)"
            )


def merge_recipe(
    config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    *,
    granularity: Optional[str] = None,
    config_source: Optional[str] = None,
    save_frozen: Optional[str] = None,
    source_name: str = "the recipe",
    overwrite: bool = False,
) -> MergeResult:
    """Merge any mergekit recipe into ``out_path``; a NAN one at ``granularity``.

    For a ``nan``/``<method>+nan`` recipe, ``granularity`` None means the
    recipe's ``nan_granularity``, else ``tensor``. Any other recipe is merged
    as the stock ``mergekit-yaml`` merges it; ``granularity`` and
    ``save_frozen`` must then be None (``ValueError``). ``config_source`` is
    the recipe's text (for the model card and ``mergekit_config.yml``); ``save_frozen`` a path for the frozen stock
    recipe (measuring the coefficients at ``tensor`` granularity too).
    ``out_path`` must be new or empty unless ``overwrite``; it is replaced
    whole once the model is complete, and left as it was if anything fails
    (:class:`~mergekit_nan.commands.common.output.OutputNotEmpty` for a non-empty one
    without ``overwrite``).
    """
    source = config_source if config_source is not None else config.to_yaml()
    target = Path(os.path.realpath(os.path.expanduser(out_path)))
    if not uses_nan(config):
        _refuse_nan_options(config, granularity, save_frozen)
        check_models(config)
        _merge_stock(config, target, options, source, overwrite)
        return MergeResult(None, None, None, target)
    granularity = resolve_granularity(config, granularity)
    require_nan_recipe(config)
    plain = without_granularity(config)
    inspection = frozen = None
    with _writing(target, plain, options, overwrite) as (partial, options):
        if granularity != "tensor" or save_frozen is not None:
            inspection = measure_recipe(plain, granularity, options)
            frozen = frozen_yaml(
                freeze_recipe(inspection), source=source_name, inspection=inspection
            )
        if save_frozen is not None:
            write_files({save_frozen: lambda path: Path(path).write_text(frozen, encoding="utf-8")})
        # mergekit's own card would name the partial directory: this module writes it.
        inner = options.model_copy(update={"write_model_card": False})
        if granularity == "tensor":
            with recording() as records:  # the norms the merge computes, for the card
                run_merge(plain, str(partial), options=inner, config_source=source)
            found = recorded_premise(records)
        else:
            merged = MergeConfiguration.model_validate(yaml.safe_load(frozen))
            run_merge(merged, str(partial), options=inner, config_source=frozen)
            found = premise(inspection)
        if options.write_model_card:
            files = card_files(
                target.name, plain, source, granularity, inspection, frozen, options, found
            )
            write_card_files(partial, files)
    return MergeResult(granularity, inspection, frozen, target)


def _merge_stock(
    config: MergeConfiguration, target: Path, options: MergeOptions, source: str, overwrite: bool
) -> None:
    """``run_merge`` as the stock ``mergekit-yaml`` calls it, into a partial directory."""
    with _writing(target, config, options, overwrite) as (partial, options):
        # mergekit's own card would name the partial directory: this module writes it.
        inner = options.model_copy(update={"write_model_card": False})
        run_merge(config, str(partial), options=inner, config_source=source)
        if options.write_model_card:
            write_card_files(partial, stock_card_files(target.name, config, source, options))
