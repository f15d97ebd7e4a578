"""Findings about names in a recipe: the method, parameter keys, ``nan_granularity``.

Each function returns the finding for one place (``where``, a path into the
recipe as written); :mod:`mergekit_nan.doctor.recipe_checks` decides where to look.
"""

from __future__ import annotations

import difflib
from typing import Any, List, Mapping, Optional, Sequence

import mergekit.merge_methods.registry as registry
from mergekit import merge_methods
from mergekit.merge_methods.base import MergeMethod

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.recipe_walk import NAN_PREFIX, Scope
from mergekit_nan.modifier import COMPOSITE_SUFFIX
from mergekit_nan.parameters import NAN_GRANULARITIES, NAN_GRANULARITY
from mergekit_nan.registration import (
    UnknownCompositeError,
    modifiable_methods,
    register_methods,
)

__all__ = [
    "NAN_PREFIX",
    "forgotten_nan",
    "granularity_findings",
    "ignored_parameter",
    "reads_nan",
    "unknown_method",
    "unknown_parameter",
]

_POOLS = {"layer": "the norms of each layer", "model": "the norms of the whole model"}


def _suggestion(name: str, choices: Sequence[str]) -> Optional[str]:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_method(name: Any) -> Finding:
    """The error for a merge_method that is missing or not registered (after the plugin's)."""
    register_methods()
    known = [m.spec.name for m in registry.registered_methods()]
    if not isinstance(name, str) or not name:
        return Finding(
            "error",
            "unknown-method",
            "merge_method",
            "the recipe names no merge_method: mergekit would fail",
            "set merge_method, e.g. `nan` or `ties+nan`",
        )
    try:
        merge_methods.get(name)
    except UnknownCompositeError as error:
        message = str(error)
    except RuntimeError:
        message = f"there is no merge method {name!r}: mergekit would fail"
    close = _suggestion(name, known)
    fix = f"did you mean `{close}`?" if close else "use one of: " + ", ".join(sorted(known))
    return Finding("error", "unknown-method", "merge_method", message, fix)


def reads_nan(method: MergeMethod) -> bool:
    """Whether ``method`` declares any ``nan_*`` parameter."""
    return any(p.name.startswith(NAN_PREFIX) for p in method.spec.parameters)


def forgotten_nan(method: MergeMethod, name: str, where: str) -> Finding:
    """A ``nan_*`` key on a method that reads none: the most dangerous silent mistake."""
    method_name = method.spec.name
    composite = method_name + COMPOSITE_SUFFIX
    register_methods()
    known = {m.spec.name for m in registry.registered_methods()}
    nan_names = [p.name for p in merge_methods.get("nan").spec.parameters]
    typo = _suggestion(name, nan_names) if name not in nan_names else None
    with_typo = f" (with `{typo}`)" if typo else ""
    if composite in known:
        return Finding(
            "warning",
            "forgotten-nan",
            where,
            f"{method_name} ignores {name}: the merge would use your hand-tuned weights, not NAN's",
            f"did you mean `{composite}`{with_typo}?",
        )
    return Finding(
        "warning",
        "forgotten-nan",
        where,
        f"{method_name} ignores {name}: {method_name} takes no per-model weight, so NAN "
        "cannot set its coefficients and the merge would not use NAN at all",
        f"use `merge_method: nan`{with_typo}, or one of "
        + ", ".join(m + COMPOSITE_SUFFIX for m in modifiable_methods()),
    )


def unknown_parameter(method: MergeMethod, name: str, where: str) -> Finding:
    """A key the method does not declare, with the closest declared name."""
    declared = [p.name for p in method.spec.parameters]
    close = _suggestion(name, declared)
    if close:
        fix = f"did you mean `{close}`?"
    else:
        fix = f"{method.spec.name} declares: " + (", ".join(declared) or "no parameters")
    return Finding(
        "warning",
        "unknown-parameter",
        where,
        f"{method.spec.name} has no parameter {name}: mergekit ignores it silently, so "
        "the merge would run as if it were not there",
        fix,
    )


def granularity_findings(scope: Scope, setting: Any, where: str) -> List[Finding]:
    """``nan_granularity``: misplaced, not a plain value, invalid, or needing ``mergekit-nan merge``."""
    name = NAN_GRANULARITY.name
    if scope.kind != "global":
        return [
            Finding(
                "error",
                "granularity-placement",
                where,
                f"{name} is set in {scope.where}; it applies to the whole merge, so it "
                "belongs once in the top-level parameters",
                f"move {name} to the top-level `parameters` as a plain value "
                f"({', '.join(NAN_GRANULARITIES)})",
            )
        ]
    if isinstance(setting, (list, Mapping)):
        return [
            Finding(
                "error",
                "granularity-placement",
                where,
                f"{name} must be one plain value for the whole merge, not a filter or a gradient",
                f"set {name} to one of {', '.join(NAN_GRANULARITIES)}",
            )
        ]
    if setting not in NAN_GRANULARITIES:
        close = _suggestion(str(setting), NAN_GRANULARITIES)
        return [
            Finding(
                "error",
                "invalid-value",
                where,
                f"{name}: {setting!r} is refused: {name} must be one of "
                f"{', '.join(NAN_GRANULARITIES)}",
                f"did you mean `{close}`?"
                if close
                else f"use one of {', '.join(NAN_GRANULARITIES)}",
            )
        ]
    if setting in _POOLS:
        return [
            Finding(
                "info",
                "granularity-needs-merge",
                where,
                f"{name}: {setting} pools {_POOLS[setting]} before merging, which only "
                "`mergekit-nan merge` can do; the stock mergekit-yaml and mergekit-multi "
                "compute per-tensor coefficients and refuse it",
                "run `mergekit-nan merge RECIPE OUT_PATH`",
            )
        ]
    return []


def ignored_parameter(method: MergeMethod, name: str, where: str, model: Optional[str]) -> Finding:
    """A shared parameter set for one model, where mergekit never reads it."""
    return Finding(
        "warning",
        "ignored-parameter",
        where,
        f"{name} applies to the whole merge on {method.spec.name}, and mergekit reads it "
        f"only from the top-level, module or slice parameters: this value for model "
        f"{model} is ignored",
        f"move {name} to the top-level `parameters` (or a slice's)",
    )
