"""Numbers in a recipe and the limits they meet: the vocabulary of the value checks.

:class:`Problem` is a finding without its place (the caller adds it with
:meth:`Problem.at`); :class:`Limit` is the largest magnitude the merge's
dtypes hold. :func:`number` reads a written value as a float, :func:`refusal`
says in plain words why a parameter refuses a value, and :func:`overflow`
and :func:`extreme` are the problems of a scale beyond the dtype's range or
beyond :data:`EXTREME_SCALE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from mergekit.common import dtype_from_name
from mergekit.merge_methods.base import ParameterSpec
from pydantic import ValidationError

from mergekit_nan.doctor.findings import Finding, Level

__all__ = [
    "EXTREME_SCALE",
    "SCALING_PARAMETERS",
    "Limit",
    "Problem",
    "dtype_limit",
    "extreme",
    "is_numeric",
    "number",
    "overflow",
    "refusal",
]

SCALING_PARAMETERS = ("weight", "lambda", "scale")
"""Parameters that multiply tensors: a value beyond the dtype's range gives Inf."""

EXTREME_SCALE = 10.0
"""A ``lambda`` or ``<method>+nan`` weight total beyond this (in magnitude) gets a warning:
it extrapolates the task vectors that many times, far outside what merges use (0.5 to 2)."""


@dataclass(frozen=True)
class Problem:
    """A finding without its place."""

    level: Level
    code: str
    message: str
    fix: Optional[str] = None

    def at(self, where: str, tensor: Optional[str] = None) -> Finding:
        return Finding(self.level, self.code, where, self.message, self.fix, tensor)


@dataclass(frozen=True)
class Limit:
    """The largest magnitude the merge's dtypes hold, and the dtype that sets it."""

    dtype: str
    max: float


_FLOAT32 = Limit("float32", torch.finfo(torch.float32).max)


def dtype_limit(dtype: Optional[str], out_dtype: Optional[str]) -> Optional[Limit]:
    """The narrowest of ``dtype`` and ``out_dtype``; float32 when neither is set.

    None when a name is not a floating-point dtype mergekit knows (mergekit
    reports that itself).
    """
    limits = []
    for name in (dtype, out_dtype):
        if not name:
            continue
        try:
            torch_dtype = dtype_from_name(str(name))
        except RuntimeError:
            return None
        if not torch_dtype.is_floating_point:
            return None
        limits.append(Limit(str(torch_dtype).replace("torch.", ""), torch.finfo(torch_dtype).max))
    return min(limits, key=lambda limit: limit.max, default=_FLOAT32)


def number(value: Any) -> Optional[float]:
    """A numeric value as a float (strings such as ``1e400`` too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, str)):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf  # an integer beyond the float range
        except ValueError:
            return None
    return None


def is_numeric(spec: ParameterSpec) -> bool:
    """Whether a parameter takes a number (not a switch or a label)."""
    try:
        value = spec.validate(1)
    except Exception:  # noqa: BLE001 - any refusal means "not a number"
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_EXPECTED = {
    "float": "a number",
    "int": "a whole number",
    "bool": "true or false",
    "string": "text",
}
"""What pydantic's ``<kind>_parsing``/``<kind>_type`` errors expect, in words."""


def refusal(spec: ParameterSpec, value: Any) -> Optional[str]:
    """Why ``spec`` refuses ``value``, in plain words; None when it accepts it."""
    try:
        spec.validate(value)
    except ValidationError as error:
        problem = error.errors()[0]
        kind = problem["type"].rsplit("_", 1)[0]
        if problem["type"].endswith(("_parsing", "_type")) and kind in _EXPECTED:
            return f"{spec.name} must be {_EXPECTED[kind]}"
        message = problem["msg"].removeprefix("Value error, ")
        return message[:1].lower() + message[1:]
    except Exception as error:  # noqa: BLE001 - RecipeError and friends speak for themselves
        return str(error)
    return None


def extreme(what: str, value: float, name: str) -> Problem:
    return Problem(
        "warning",
        "extreme-scale",
        f"{what} extrapolates the task vectors {abs(value):g} times (beyond "
        f"{EXTREME_SCALE:g}): the merged weights would be far from every input",
        f"use a {name} of about 0.5 to 2 (1 keeps the scale of the inputs)",
    )


def overflow(what: str, name: str, limit: Limit) -> Problem:
    wider = ", or merge in float32" if limit.dtype == "float16" else ""
    return Problem(
        "error",
        "overflow",
        f"{what} overflows {limit.dtype} (max {limit.max:g}): the merged tensor would be Inf",
        f"lower {name}{wider}",
    )
