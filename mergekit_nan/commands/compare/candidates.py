"""The candidates of ``mergekit-nan compare``: recipes derived from the user's one.

* the recipe as written;
* its baseline, the same recipe without NAN: ``nan`` becomes uniform task
  arithmetic (``task_arithmetic`` with weight ``1/n`` per model and the same
  ``lambda``; ``linear`` with equal weights without a base), ``<method>+nan``
  becomes ``<method>`` with equal weights whose total is the recipe's weight
  total (the sum of its plain per-model ``weight`` values, else 1, as NAN's
  scale rule has it). The ``nan_*`` parameters and the user's ``weight``
  priors are dropped; :attr:`CandidateSet.dropped` names the priors;
* sweeps: the recipe with a top-level ``nan_exponent``, ``lambda`` or
  ``nan_granularity`` set to each value given;
* other recipes (``--against``), as written;
* ``--inputs``: the base and each input model alone (no merge).

A derived recipe equal to one already listed is left out (it would be merged
twice for the same numbers). Candidates with the same :func:`norm_group`
need the same norms, so compare runs their norm pass once. Recipes are plain mappings, exactly what stock
``mergekit-yaml`` (with the plugin) merges; one with ``nan_granularity`` layer or
model is what ``mergekit-nan merge`` merges.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_nan.modifier import COMPOSITE_SUFFIX
from mergekit_nan.parameters import NAN_EXPONENT, NAN_GRANULARITY, NAN_NORM

__all__ = ["Candidate", "CandidateSet", "build_candidates", "norm_group", "parse_values"]

_NAN_KEYS = (NAN_EXPONENT.name, NAN_NORM.name, NAN_GRANULARITY.name)
_AFTER_THE_NORMS = (NAN_EXPONENT.name, "lambda", NAN_GRANULARITY.name)
"""Top-level parameters that act only on the norms once measured, never on the norms."""


@dataclass(frozen=True)
class Candidate:
    """One model to evaluate: a recipe to merge, or an input model (``recipe`` None).

    ``kind`` is ``recipe``, ``baseline``, ``exponent``, ``lambda``,
    ``granularity``, ``against`` or ``input``; ``value`` the swept value.
    """

    label: str
    kind: str
    recipe: Optional[Dict[str, Any]] = None
    model: Optional[str] = None
    value: Any = None

    @property
    def merged(self) -> bool:
        return self.recipe is not None


@dataclass(frozen=True)
class CandidateSet:
    """The candidates in order (recipe, baseline, sweeps, others, inputs) and notes."""

    candidates: Tuple[Candidate, ...]
    baseline: int
    dropped: Tuple[str, ...] = ()
    skipped: Tuple[str, ...] = field(default_factory=tuple)


def parse_values(option: str, text: Optional[str], kind: type) -> Tuple[Any, ...]:
    """``"1,0,-1"`` as values of ``kind``; a ``ValueError`` naming ``option`` otherwise."""
    if text is None:
        return ()
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(kind(item))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a {kind.__name__}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value")
    return tuple(values)


def norm_group(recipe: Mapping[str, Any]) -> str:
    """What the norms of ``recipe``'s merge depend on, as a comparable string.

    The recipe without its top-level ``nan_exponent``, ``lambda`` and
    ``nan_granularity``: the exponent and ``lambda`` act on coefficients
    computed from the norms, and a granularity pools them. Everything else
    (models, base, ``nan_norm``, slices, dtype, every per-model parameter)
    stays, so recipes in one group plan the same tensors from the same inputs.
    """
    parameters = {
        k: v for k, v in (recipe.get("parameters") or {}).items() if k not in _AFTER_THE_NORMS
    }
    rest = {k: v for k, v in recipe.items() if k != "parameters"}
    return json.dumps({**rest, "parameters": parameters}, sort_keys=True, default=str)


def _model_entries(recipe: Mapping[str, Any]) -> List[Dict[str, Any]]:
    if recipe.get("slices") or recipe.get("modules"):
        raise ValueError(
            "compare derives its baseline from a recipe with a models: list; this one uses "
            "slices or modules (give the baseline yourself with --against)"
        )
    models = recipe.get("models")
    if not models:
        raise ValueError("the recipe has no models: list")
    return models


def _name(entry: Any) -> str:
    return str(entry.get("model") if isinstance(entry, Mapping) else entry)


def _without_nan(parameters: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    return {k: v for k, v in (parameters or {}).items() if k not in _NAN_KEYS and k != "weight"}


def baseline_recipe(recipe: Mapping[str, Any]) -> Tuple[Dict[str, Any], str, Tuple[str, ...]]:
    """The recipe without NAN, its label, and the dropped ``weight`` priors (described)."""
    method = recipe["merge_method"]
    base = recipe.get("base_model")
    entries = _model_entries(recipe)
    weighed = [e for e in entries if base is None or _name(e) != str(base)]
    dropped = []
    total = 0.0
    plain = True
    for entry in weighed:
        weight = (entry.get("parameters") or {}).get("weight")
        if weight is None:
            continue
        dropped.append(f"{_name(entry)} ({weight})")
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            total += float(weight)
        else:
            plain = False
    top = dict(recipe.get("parameters") or {})
    if "weight" in top:
        dropped.append(f"the recipe's weight ({top['weight']})")
    if method == "nan":
        inner = "task_arithmetic" if base is not None else "linear"
        each = 1.0 / len(weighed) if base is not None else 1.0
        label = "uniform"
    elif method.endswith(COMPOSITE_SUFFIX):
        inner = method[: -len(COMPOSITE_SUFFIX)]
        each = (total if dropped and plain and total else 1.0) / len(weighed)
        label = inner
    else:
        raise ValueError(
            f"the recipe's merge_method is {method!r}, which does not use NAN; compare "
            "measures a nan or <method>+nan recipe against its baseline"
        )
    out = copy.deepcopy(dict(recipe))
    out["merge_method"] = inner
    models = []
    for entry in entries:
        if isinstance(entry, Mapping) and entry in weighed:
            parameters = _without_nan(entry.get("parameters"))
            parameters["weight"] = each
            models.append({**copy.deepcopy(dict(entry)), "parameters": parameters})
        else:
            models.append(copy.deepcopy(entry))
    out["models"] = models
    parameters = _without_nan(top)
    if parameters:
        out["parameters"] = parameters
    else:
        out.pop("parameters", None)
    return out, label, tuple(dropped)


def _with_parameter(recipe: Mapping[str, Any], name: str, value: Any) -> Dict[str, Any]:
    out = copy.deepcopy(dict(recipe))
    parameters = dict(out.get("parameters") or {})
    if name == NAN_GRANULARITY.name and value == "tensor":
        parameters.pop(name, None)
    else:
        parameters[name] = value
    if parameters:
        out["parameters"] = parameters
    else:
        out.pop("parameters", None)
    return out


def _short(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def _number(value: float) -> str:
    return f"{value:g}"


def build_candidates(
    recipe: Mapping[str, Any],
    *,
    exponents: Sequence[float] = (),
    lambdas: Sequence[float] = (),
    granularities: Sequence[str] = (),
    against: Sequence[Tuple[str, Mapping[str, Any]]] = (),
    inputs: bool = False,
    takes_lambda: bool = True,
) -> CandidateSet:
    """Every candidate for ``recipe`` (a mapping as read from YAML).

    ``against`` pairs a label (the file name) with each other recipe;
    ``takes_lambda`` says whether the recipe's method declares ``lambda``
    (a ``lambda`` sweep on one that does not is refused: mergekit would
    ignore the value silently).
    """
    if lambdas and not takes_lambda:
        raise ValueError(
            f"--lambda: merge_method {recipe['merge_method']} takes no lambda "
            "(mergekit would ignore it)"
        )
    method = str(recipe["merge_method"])
    baseline, baseline_label, dropped = baseline_recipe(recipe)
    found: List[Candidate] = [
        Candidate(method, "recipe", copy.deepcopy(dict(recipe))),
        Candidate(baseline_label, "baseline", baseline),
    ]
    skipped: List[str] = []

    def add(candidate: Candidate) -> None:
        for other in found:
            if candidate.recipe is not None and other.recipe == candidate.recipe:
                skipped.append(f"{candidate.label} (the same recipe as {other.label})")
                return
        labels = {c.label for c in found}
        label, number = candidate.label, 2
        while label in labels:
            label, number = f"{candidate.label} #{number}", number + 1
        found.append(
            Candidate(label, candidate.kind, candidate.recipe, candidate.model, candidate.value)
        )

    top = recipe.get("parameters") or {}

    def same(name: str, value: Any, default: Any) -> bool:
        """Whether the recipe already merges with ``value`` (its own, or the default)."""
        if top.get(name, default) == value:
            skipped.append(f"{name} {value} (the recipe's own)")
            return True
        return False

    exponents = [v for v in exponents if not same(NAN_EXPONENT.name, v, 1.0)]
    lambdas = [v for v in lambdas if not same("lambda", v, 1.0)]
    granularities = [v for v in granularities if not same(NAN_GRANULARITY.name, v, "tensor")]
    for value in exponents:
        add(
            Candidate(
                f"{method} exponent={_number(value)}",
                "exponent",
                _with_parameter(recipe, NAN_EXPONENT.name, value),
                value=value,
            )
        )
    for value in lambdas:
        add(
            Candidate(
                f"{method} lambda={_number(value)}",
                "lambda",
                _with_parameter(recipe, "lambda", value),
                value=value,
            )
        )
    for value in granularities:
        add(
            Candidate(
                f"{method} granularity={value}",
                "granularity",
                _with_parameter(recipe, NAN_GRANULARITY.name, value),
                value=value,
            )
        )
    for label, other in against:
        add(Candidate(label, "against", copy.deepcopy(dict(other))))
    if inputs:
        base = recipe.get("base_model")
        if base is not None:
            name = _short(str(base))
            add(Candidate("base" if name == "base" else f"base {name}", "input", model=str(base)))
        for entry in _model_entries(recipe):
            name = _name(entry)
            if base is not None and name == str(base):
                continue
            if "+" in name:
                raise ValueError(
                    f"--inputs: {name} is a model with a LoRA adapter; "
                    "compare evaluates plain model directories alone"
                )
            add(Candidate(f"input {_short(name)}", "input", model=name))
    return CandidateSet(tuple(found), 1, dropped, tuple(skipped))
