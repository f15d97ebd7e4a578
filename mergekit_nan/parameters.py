"""The NAN parameters as mergekit parameter specs, shared by ``nan`` and ``<method>+nan``.

Each value type validates itself (pydantic), so a bad recipe fails while
mergekit plans the merge, before any tensor is read or written. Validators
raise :class:`~mergekit_nan.errors.RecipeError`, which pydantic passes through
unwrapped, so the user reads the plugin's message and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import AfterValidator
from typing_extensions import Annotated, Literal, get_args

from mergekit_nan.errors import RecipeError

__all__ = [
    "NAN_GRANULARITIES",
    "NAN_GRANULARITY",
    "NAN_NORMS",
    "NAN_EXPONENT",
    "NAN_NORM",
    "Granularity",
    "NanNorm",
    "finite_float",
    "optional",
    "stock_granularity_error",
]

NanNorm = Literal["auto", "delta", "weights"]
NAN_NORMS: Tuple[str, ...] = get_args(NanNorm)
"""``auto``: task vectors when the merge has a base, else the tensors themselves;
``delta``: task vectors theta_i - theta_base (needs a base);
``weights``: the fine-tuned tensors theta_i themselves."""


def _checked_norm(value: str) -> str:
    if value not in NAN_NORMS:
        raise RecipeError(f"nan_norm must be one of {', '.join(NAN_NORMS)}; got {value!r}")
    return value


def finite_float(name: str, *, non_negative: bool = False):
    """A float type that rejects NaN/Inf (and negatives) with a message naming ``name``."""

    def check(value: float) -> float:
        if not math.isfinite(value):
            raise RecipeError(f"{name} must be finite; got {value}")
        if non_negative and value < 0:
            raise RecipeError(f"{name} must be non-negative; got {value}")
        return value

    return Annotated[float, AfterValidator(check)]


def optional(spec: ParameterSpec) -> ParameterSpec:
    """``spec`` with None allowed and the default: a value the recipe may leave out."""
    return replace(spec, value_type=Optional[spec.value_type], default=None)


NAN_EXPONENT = ParameterSpec(
    "nan_exponent",
    finite_float("nan_exponent"),
    ParameterScope.SHARED,
    default=1.0,
    description="p in alpha_i ~ ||x_i||^-p: 1 inverse norm, 2 inverse variance, 0 plain average",
)
NAN_NORM = ParameterSpec(
    "nan_norm",
    Annotated[str, AfterValidator(_checked_norm)],
    ParameterScope.SHARED,
    default="auto",
    description="what x_i is: auto, delta (theta_i - theta_base) or weights (theta_i)",
)

Granularity = Literal["tensor", "layer", "model"]
NAN_GRANULARITIES: Tuple[str, ...] = get_args(Granularity)
"""``tensor``: each tensor's own norms; ``layer``: norms pooled over a transformer
layer; ``model``: norms pooled over the whole model. Only ``tensor`` can be
computed inside a merge method; the others need ``mergekit-nan merge``."""

_POOLED = {
    "layer": "the norms of every tensor of a layer",
    "model": "the norms of the whole model",
}


def stock_granularity_error(value: object) -> RecipeError:
    """The error for a ``nan_granularity`` that a merge inside mergekit cannot honour.

    ``layer``/``model`` point to ``mergekit-nan merge``; anything else that is
    not ``tensor`` gets the list of choices.
    """
    if isinstance(value, str) and value in _POOLED:
        return RecipeError(
            f"nan_granularity: {value} needs {_POOLED[value]}, which a merge method "
            "inside mergekit-yaml cannot see; run `mergekit-nan merge RECIPE OUT_PATH` "
            "(or set nan_granularity: tensor)"
        )
    return RecipeError(
        f"nan_granularity must be one of {', '.join(NAN_GRANULARITIES)}; got {value!r}"
    )


def _checked_granularity(value: str) -> str:
    if value != "tensor":
        raise stock_granularity_error(value)
    return value


NAN_GRANULARITY = ParameterSpec(
    "nan_granularity",
    Annotated[str, AfterValidator(_checked_granularity)],
    ParameterScope.SHARED,
    default="tensor",
    description="tensor (per-tensor norms); layer and model are read by mergekit-nan merge",
)
