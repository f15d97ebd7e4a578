"""Granularity: over which tensors NAN pools the norms behind one coefficient.

* ``tensor`` (the default): every output tensor gets the ratios of its own
  norms ``||x_i,t||``; this is what ``nan`` and ``<method>+nan`` compute inside
  any mergekit command.
* ``layer``: for each output transformer layer (the layer index the planner
  gives the tensor inside its module), model i's norm is
  ``sqrt(sum_t ||x_i,t||^2)`` over the NAN-weighed tensors of that layer, and
  every tensor of the layer gets the ratios of those pooled norms. Tensors
  outside the layers (embeddings, final norm, ``lm_head``: the planner's pre
  and post weights) are groups of one and keep their per-tensor coefficients.
* ``model``: model i's norm is ``sqrt(sum_t ||x_i,t||^2)`` over every tensor
  NAN weighs, and every tensor gets the ratios of those whole-model norms.

Pooling only replaces the norms: the exponent, the priors, the scale and the
zero-norm rule of each tensor stay its own. ``layer`` and ``model`` need every
tensor's norm before the first tensor is merged, which a merge method inside
mergekit cannot see; ``mergekit-nan merge`` measures them in one streaming
pass first.

In a recipe, ``nan_granularity`` is a plain value in the top-level
``parameters``; :func:`recipe_granularity` reads it and refuses it anywhere
else (per model, per slice, with a filter or a gradient).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple

from mergekit.config import MergeConfiguration

from mergekit_nan.errors import RecipeError
from mergekit_nan.parameters import NAN_GRANULARITIES, NAN_GRANULARITY, Granularity
from mergekit_nan.weighting import Weighting

__all__ = [
    "checked_granularity",
    "pooled_weightings",
    "recipe_granularity",
    "resolve_granularity",
    "without_granularity",
]

GroupKey = Optional[Tuple[str, int]]
"""What a tensor pools with: ``(module, layer)``, or None for a group of one."""


def checked_granularity(value: Any) -> Granularity:
    """``value`` if it names a granularity, else a :class:`RecipeError` listing them."""
    if not isinstance(value, str) or value not in NAN_GRANULARITIES:
        raise RecipeError(
            f"nan_granularity must be one of {', '.join(NAN_GRANULARITIES)}; got {value!r}"
        )
    return value  # type: ignore[return-value]


def _scopes(config: MergeConfiguration) -> Iterable[Tuple[str, Optional[Mapping[str, Any]]]]:
    """Every parameter scope of ``config`` but the top level, with where it is."""
    for index, model in enumerate(config.models or ()):
        yield f"models[{index}] ({model.model})", model.parameters

    def slices(prefix: str, items) -> Iterable[Tuple[str, Optional[Mapping[str, Any]]]]:
        for index, output_slice in enumerate(items or ()):
            yield f"{prefix}slices[{index}]", output_slice.parameters
            for number, source in enumerate(output_slice.sources):
                where = f"{prefix}slices[{index}].sources[{number}] ({source.model})"
                yield where, source.parameters

    yield from slices("", config.slices)
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}", module.parameters
        for index, model in enumerate(module.models or ()):
            yield f"modules.{name}.models[{index}] ({model.model})", model.parameters
        yield from slices(f"modules.{name}.", module.slices)


def recipe_granularity(config: MergeConfiguration) -> Optional[Granularity]:
    """The recipe's ``nan_granularity`` (None when absent).

    Raises :class:`RecipeError` for a value that is not a granularity, for a
    filter or gradient, and for a ``nan_granularity`` outside the top-level
    ``parameters`` (the message names where it is).
    """
    name = NAN_GRANULARITY.name
    for where, parameters in _scopes(config):
        if parameters and name in parameters:
            raise RecipeError(
                f"{name} is set in {where}; it applies to the whole merge, so set it "
                "once in the top-level parameters"
            )
    value = (config.parameters or {}).get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(
            f"{name} must be one plain value in the top-level parameters "
            f"(tensor, layer or model), not a filter or gradient; got {value!r}"
        )
    return checked_granularity(value)


def resolve_granularity(config: MergeConfiguration, requested: Optional[str] = None) -> Granularity:
    """``requested`` when given (the command line wins), else the recipe's, else tensor.

    The recipe's value is checked even when ``requested`` overrides it.
    """
    from_recipe = recipe_granularity(config)
    if requested is not None:
        return checked_granularity(requested)
    return from_recipe or "tensor"


def without_granularity(config: MergeConfiguration) -> MergeConfiguration:
    """A copy of ``config`` without the top-level ``nan_granularity``, ready for planning."""
    parameters = dict(config.parameters or {})
    parameters.pop(NAN_GRANULARITY.name, None)
    return config.model_copy(update={"parameters": parameters or None}, deep=True)


def pooled_weightings(
    measured: List[Tuple[GroupKey, Weighting]], granularity: Granularity
) -> Tuple[List[Weighting], Dict[GroupKey, Dict[Hashable, float]]]:
    """Each tensor's weighting at ``granularity``, and the pooled norms per group.

    ``measured`` pairs each tensor's group key with its per-tensor weighting.
    At ``tensor`` nothing changes and no norms are pooled; at ``model`` every
    tensor is in the group ``None``; at ``layer`` a tensor with key None keeps
    its own weighting.
    """
    if granularity == "tensor":
        return [weighting for _, weighting in measured], {}
    squares: Dict[GroupKey, Dict[Hashable, float]] = {}
    for key, weighting in measured:
        if granularity == "model":
            key = None
        elif key is None:
            continue
        group = squares.setdefault(key, {})
        for model, norm in zip(weighting.models, weighting.norms):
            group[model] = group.get(model, 0.0) + norm * norm
    pooled = {
        key: {model: math.sqrt(value) for model, value in group.items()}
        for key, group in squares.items()
    }
    result = []
    for key, weighting in measured:
        group = pooled.get(None if granularity == "model" else key)
        if group is None:
            result.append(weighting)
        else:
            result.append(weighting.with_norms([group[model] for model in weighting.models]))
    return result, pooled
