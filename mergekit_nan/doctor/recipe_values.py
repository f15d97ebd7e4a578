"""Checks on parameter values: one value on its own, and a group's weights together.

Both kinds work on plain numbers, so the recipe doctor applies them to the
values written in a recipe and to the values mergekit resolved per tensor.
They return :class:`~mergekit_nan.doctor.recipe_limits.Problem` objects (a
finding without its place); the caller adds the place.

How a method uses ``weight`` decides what is wrong with it
(:func:`weight_rule`):

* ``prior`` (``nan``): a non-negative prior multiplying NAN's estimate;
  negative or all-zero priors make the merge fail;
* ``total`` (``<method>+nan``): only the sum counts, as the total of NAN's
  weights; it must not be zero, and weights go on every model or none;
* ``normalised`` (``linear``, ``multislerp``, ``nuslerp``, and the
  task-arithmetic family with ``normalize: true``): the method divides by the
  sum, so a zero sum breaks the merge and a negative weight extrapolates;
* ``plain`` (the task-arithmetic family without ``normalize``): any value is
  meaningful, only overflow is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from mergekit.merge_methods.base import MergeMethod, ParameterScope, ParameterSpec
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from typing_extensions import Literal

from mergekit_nan.doctor.recipe_limits import (
    EXTREME_SCALE,
    SCALING_PARAMETERS,
    Limit,
    Problem,
    extreme,
    is_numeric,
    number,
    overflow,
    refusal,
)
from mergekit_nan.method import NanMerge
from mergekit_nan.modifier import NanCoefficients, takes_weight

__all__ = ["WeightRule", "value_problems", "weight_problems", "weight_rule"]

_NORMALISE_SWITCHES = ("normalize", "normalize_weights")
_ZERO = 1e-6
"""A weight sum below this fraction of the sum of magnitudes counts as zero."""


WeightRole = Literal["prior", "total", "normalised", "plain"]


@dataclass(frozen=True)
class WeightRule:
    """How one merge method uses its per-model ``weight``.

    ``switch`` is the shared boolean that turns normalisation on (None: the
    role does not depend on one); ``inner`` is the method that finally
    receives the weights (the inner method of a composite, else the method).
    """

    method: str
    role: WeightRole
    scope: ParameterScope
    switch: Optional[str]
    inner: MergeMethod

    def normalising(self, switch_value: Any) -> bool:
        return self.role == "normalised" and (self.switch is None or switch_value is True)


def _switch(method: MergeMethod) -> Optional[str]:
    names = {p.name for p in method.spec.shared_parameters}
    return next((name for name in _NORMALISE_SWITCHES if name in names), None)


def weight_rule(method: MergeMethod) -> Optional[WeightRule]:
    """The rule for ``method``'s ``weight``; None for a method without one."""
    if not takes_weight(method):
        return None
    scope = next(p.scope for p in method.spec.parameters if p.name == "weight")
    name = method.spec.name
    if isinstance(method, NanMerge):
        return WeightRule(name, "prior", scope, None, method)
    if isinstance(method, NanCoefficients):
        return WeightRule(name, "total", scope, None, method.inner)
    switch = _switch(method)
    if switch is not None or name == "nuslerp":
        return WeightRule(name, "normalised", scope, switch, method)
    return WeightRule(name, "plain", scope, None, method)


def _consequence(inner: MergeMethod, all_zero: bool) -> str:
    """What ``inner`` makes of weights that sum to zero."""
    name = inner.spec.name
    if isinstance(inner, GeneralizedTaskArithmeticMerge):
        if all_zero:
            return f"{name} would add no task vector and write the base model unchanged"
        return (
            f"{name} divides by that sum, except where mergekit replaces a zero divisor "
            "by 1, so the weights are not normalised as written"
        )
    if name == "nuslerp":
        return "nuslerp then ignores the weights and interpolates half-way (t = 0.5)"
    return f"{name} divides by that sum: the merged tensors would be NaN or Inf"


def _models(names: Sequence[str]) -> str:
    return ", ".join(names)


def _text(value: Any) -> str:
    parsed = number(value)
    return f"{parsed:g}" if parsed is not None and not isinstance(value, str) else str(value)


def value_problems(
    spec: ParameterSpec,
    value: Any,
    *,
    model: Optional[str],
    rule: Optional[WeightRule],
    normalising: bool,
    limit: Optional[Limit],
) -> List[Problem]:
    """What is wrong with one written ``value`` of the declared parameter ``spec``.

    ``model`` names the model for a per-model value; ``normalising`` says
    whether the method normalises its weights as the recipe sets it up.
    """
    name = spec.name
    of_model = f" for model {model}" if model else ""
    refused = refusal(spec, value)
    parsed = number(value) if is_numeric(spec) else None
    if parsed is None:
        if refused is None:
            return []
        return [
            Problem("error", "invalid-value", f"{name}: {value!r}{of_model} is refused: {refused}")
        ]
    if not math.isfinite(parsed):
        outcome = "the merge would fail" if refused else "the merged tensors would be NaN or Inf"
        return [
            Problem(
                "error",
                "non-finite",
                f"{name} = {_text(value)}{of_model} is not a finite number: {outcome}",
                f"give {name} a finite value",
            )
        ]
    if refused is not None and not (rule and rule.role == "prior" and name == "weight"):
        return [
            Problem("error", "invalid-value", f"{name}: {value!r}{of_model} is refused: {refused}")
        ]
    problems = []
    if name in SCALING_PARAMETERS and limit and abs(parsed) > limit.max:
        # Priors are normalised away; a composite's weights count only as their total.
        if not (name == "weight" and rule and rule.role in ("prior", "total")):
            problems.append(overflow(f"{name} = {parsed:g}{of_model}", name, limit))
    elif name == "lambda" and abs(parsed) > EXTREME_SCALE:
        problems.append(extreme(f"lambda = {parsed:g}", parsed, "lambda"))
    if name == "weight" and rule is not None and parsed < 0:
        problems.extend(_negative_weight(rule, parsed, of_model, normalising))
    return problems


def _negative_weight(
    rule: WeightRule, value: float, of_model: str, normalising: bool
) -> List[Problem]:
    said = f"weight = {value:g}{of_model} is negative"
    if rule.role == "prior":
        return [
            Problem(
                "error",
                "negative-weight",
                f"{said}, but on nan a weight is a prior that multiplies NAN's estimate "
                "and must be non-negative: the merge would fail",
                "use a weight >= 0 (0 leaves the model out), or remove it (default 1.0)",
            )
        ]
    if rule.role == "total":
        return [
            Problem(
                "warning",
                "negative-weight",
                f"{said}, but on {rule.method} only the sum of the weights counts (it sets "
                "the total of NAN's weights): this weight does not negate the model, it "
                "lowers the total",
                "give positive weights whose sum is the total you want, or none",
            )
        ]
    if normalising:
        switch = f", or set {rule.switch}: false" if rule.switch else ""
        return [
            Problem(
                "warning",
                "negative-weight",
                f"{said}, and {rule.method} divides by the sum of the weights: the "
                "result extrapolates instead of averaging",
                f"use non-negative weights{switch}",
            )
        ]
    return []


def weight_problems(
    rule: WeightRule,
    weights: Sequence[Tuple[str, Optional[float]]],
    *,
    normalising: bool,
    limit: Optional[Limit],
) -> List[Problem]:
    """What is wrong with one group's weights together (model name, value or None).

    Values missing on a method that requires them, and non-finite or negative
    priors, are left to other checks.
    """
    if not weights or not (rule.role in ("prior", "total") or normalising):
        return []
    given = [(model, value) for model, value in weights if value is not None]
    if rule.role == "total" and given and len(given) < len(weights):
        missing = [model for model, value in weights if value is None]
        return [
            Problem(
                "error",
                "partial-weights",
                f"{rule.method} has a weight for {_models([m for m, _ in given])} but "
                f"none for {_models(missing)}: the weights' sum sets the total of NAN's "
                "weights, which is undefined when only some models have one; the merge "
                "would fail",
                "give every model a weight (their sum is the total) or remove them all "
                "(the total is then 1)",
            )
        ]
    values = [value for _, value in given]
    if len(given) < len(weights) or not values or not all(map(math.isfinite, values)):
        return []
    if rule.role == "prior" and any(value < 0 for value in values):
        return []
    total = _sum(values)
    names = _models([model for model, _ in given])
    if total == 0 or abs(total) <= _ZERO * _sum([abs(value) for value in values]) < math.inf:
        return [_zero_total(rule, names, total, all(value == 0 for value in values))]
    if rule.role == "total" and EXTREME_SCALE < abs(total) <= (limit.max if limit else math.inf):
        return [extreme(f"the weights of {names} sum to {total:g}, which", total, "weight total")]
    if rule.role == "prior" or limit is None or abs(total) <= limit.max:
        return []
    if rule.role == "total" or all(abs(value) <= limit.max for value in values):
        # Single weights beyond the range are reported on their own.
        return [overflow(f"the weights of {names} sum to {total:g}, which", "the weights", limit)]
    return []


def _sum(values: Sequence[float]) -> float:
    """The exact sum of finite values, or +-Inf when it leaves the float range."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.copysign(math.inf, max(values, key=abs))


def _zero_total(rule: WeightRule, names: str, total: float, all_zero: bool) -> Problem:
    if rule.role == "prior":
        return Problem(
            "error",
            "zero-weight-total",
            f"every weight on nan is 0 ({names}): the weights are priors that multiply "
            "NAN's estimate, so no model is left to merge and the merge would fail",
            "give at least one model a positive weight, or remove the weights (default 1.0)",
        )
    practically = "" if total == 0 else " (practically 0)"
    sums = f"the weights of {names} sum to {total:g}{practically}"
    if rule.role == "total":
        return Problem(
            "error",
            "zero-weight-total",
            f"{sums}: on {rule.method} that sum is the total of NAN's weights, so every "
            "model would get weight 0 and the merge would fail",
            "remove the weights (the total is then 1), or give weights whose sum is the "
            "total you want",
        )
    return Problem(
        "error",
        "zero-weight-total",
        f"{sums}, and {_consequence(rule.inner, all_zero)}",
        "give weights with a non-zero sum",
    )
