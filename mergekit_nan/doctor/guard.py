"""The recipe guard: the stock ``mergekit-yaml`` and ``mergekit-multi`` speak up about NAN recipes.

mergekit silently ignores parameters a method does not declare, and some NAN
mistakes only surface deep into a long merge. :func:`install_guard` wraps
``MergePlanner._plan`` (the start-up hook calls it when ``mergekit.plan``
loads) so that, for every recipe that uses ``nan`` or a ``<method>+nan``
method or contains a ``nan_*`` key, mergekit's planning is bracketed by the
checks of ``mergekit-nan check``:

* before planning, the recipe's own findings (:func:`recipe_findings`);
* after planning, the findings on the per-tensor values mergekit resolved
  (:func:`planned_findings`), still before any tensor is read or written.

Warnings are logged once each, on the ``mergekit_nan`` logger. Errors stop a
recipe whose merge method is ``nan`` or ``<method>+nan`` with a
:class:`~mergekit_nan.errors.RecipeError` before anything is written; on a
stock method (a stray ``nan_*`` key) they are only logged, so a recipe that
works without the plugin works with it. ``nan_granularity: layer|model`` is an
error in the stock commands, which can only compute per-tensor coefficients.

The guard never changes a plan. For recipes without NAN it does nothing at
all, and if anything about mergekit's internals is not as expected it falls
silent rather than getting in mergekit's way. Planners that mergekit-nan runs
itself (``inspect``, ``check``) set ``_mergekit_nan_unguarded = True``; a
command that has just run the same checks itself (``mergekit-nan merge``)
merges inside :func:`suspended`, so each finding is reported once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, List, Optional, Set, Tuple

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.errors import RecipeError

__all__ = ["STOCK_ONLY_ERRORS", "install_guard", "suspended"]

LOG = logging.getLogger("mergekit_nan")

_SUSPENDED: ContextVar[bool] = ContextVar("mergekit_nan_guard_suspended", default=False)

STOCK_ONLY_ERRORS = ("granularity-needs-merge",)
"""Finding codes that are fine for ``mergekit-nan merge`` but errors in the stock commands."""


class _Guard:
    """The findings reported for one planner, and whether its errors stop the merge."""

    def __init__(self, enforce: bool):
        self.enforce = enforce
        self.seen: Set[Tuple[str, str, Optional[str]]] = set()

    def report(self, findings: Iterable[Finding]) -> None:
        errors: List[Finding] = []
        for finding in findings:
            key = (finding.code, finding.where, finding.tensor)
            if key in self.seen or finding.level == "info" and not _stock_error(finding):
                continue
            self.seen.add(key)
            if finding.level == "error" or _stock_error(finding):
                errors.append(finding)
            else:
                LOG.warning("mergekit-nan: %s", finding.line())
        if not errors:
            return
        if not self.enforce:
            for finding in errors:
                LOG.warning("mergekit-nan: %s", finding.line())
            return
        lines = "\n".join(f"  {_as_error(f).line()}" for f in errors)
        raise RecipeError(
            f"this recipe cannot be merged as written:\n{lines}\n"
            "Nothing was written. `mergekit-nan check RECIPE` shows every finding."
        )


def _stock_error(finding: Finding) -> bool:
    return finding.code in STOCK_ONLY_ERRORS


def _as_error(finding: Finding) -> Finding:
    if finding.level == "error":
        return finding
    return Finding(
        "error", finding.code, finding.where, finding.message, finding.fix, finding.tensor
    )


def _start(planner: Any) -> Optional[_Guard]:
    """Check the recipe before planning; None when the guard has nothing to say."""
    if _SUSPENDED.get() or getattr(planner, "_mergekit_nan_unguarded", False):
        return None
    try:
        from mergekit_nan.doctor.recipe_checks import involves_nan, recipe_findings

        data = planner.config.model_dump(mode="json", exclude_none=True)
        if not involves_nan(data):
            return None
        findings = recipe_findings(data)
        method = str(data.get("merge_method", ""))
        guard = _Guard(enforce=method == "nan" or method.endswith("+nan"))
    except Exception as error:  # mergekit moved on: say nothing rather than break it
        LOG.debug("mergekit-nan guard skipped: %r", error)
        return None
    guard.report(findings)
    return guard


def _finish(guard: _Guard, planner: Any) -> None:
    """Check the per-tensor values mergekit resolved, before anything is executed."""
    try:
        from mergekit_nan.doctor.recipe_checks import planned_findings

        findings = planned_findings(planner)
    except Exception as error:
        LOG.debug("mergekit-nan guard skipped the planned values: %r", error)
        return
    guard.report(findings)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No guard inside this block: for callers that have just run the same checks."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def install_guard() -> None:
    """Wrap ``mergekit.plan.MergePlanner._plan`` with the guard; idempotent."""
    from mergekit.plan import MergePlanner

    original = MergePlanner.__dict__.get("_plan")
    if original is None or getattr(original, "_mergekit_nan", False):
        return

    @functools.wraps(original)
    def _plan(self, *args, **kwargs):
        guard = _start(self)
        result = original(self, *args, **kwargs)
        if guard is not None:
            _finish(guard, self)
        return result

    _plan._mergekit_nan = True
    MergePlanner._plan = _plan
