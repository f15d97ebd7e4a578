"""The NAN parameters as mergekit parameter specs, shared by ``nan`` and ``<method>+nan``.

Each value type validates itself (pydantic), so a bad recipe fails while
mergekit plans the merge, before any tensor is read or written.
"""

from __future__ import annotations

import math

from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import AfterValidator
from typing_extensions import Annotated, Literal

__all__ = [
    "NAN_NORMS",
    "NAN_EXPONENT",
    "NAN_NORM",
    "NanNorm",
    "finite_float",
]

NanNorm = Literal["auto", "delta", "weights"]
NAN_NORMS = ("auto", "delta", "weights")
"""``auto``: task vectors when the merge has a base, else the tensors themselves;
``delta``: task vectors theta_i - theta_base (needs a base);
``weights``: the fine-tuned tensors theta_i themselves."""


def _checked_norm(value: str) -> str:
    if value not in NAN_NORMS:
        raise ValueError(f"nan_norm must be one of {', '.join(NAN_NORMS)}; got {value!r}")
    return value


def finite_float(name: str, *, non_negative: bool = False):
    """A float type that rejects NaN/Inf (and negatives) with a message naming ``name``."""

    def check(value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite; got {value}")
        if non_negative and value < 0:
            raise ValueError(f"{name} must be non-negative; got {value}")
        return value

    return Annotated[float, AfterValidator(check)]


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
