"""How the recipe guard reports a recipe's findings in the stock commands.

Warnings are logged once each on the ``mergekit_nan`` logger. Errors stop a
recipe whose merge method is ``nan`` or ``<method>+nan`` with one
:class:`~mergekit_nan.errors.RecipeError`; on a stock method (a stray
``nan_*`` key) they are only logged, so a recipe that works without the plugin
works with it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, List, Optional, Set, Tuple

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.errors import RecipeError

__all__ = ["LOG", "STOCK_ONLY_ERRORS", "Guard", "enforced", "refusal"]

LOG = logging.getLogger("mergekit_nan")

STOCK_ONLY_ERRORS = ("granularity-needs-merge", "adapter-recipe")
"""Finding codes that are fine for ``mergekit-nan merge`` but errors in the stock commands."""

Reported = Set[Tuple[str, str, Optional[str]]]
"""The findings reported so far: (code, message, tensor)."""


class Guard:
    """The findings reported for one recipe, and whether its errors stop the merge.

    ``reported``: a record of findings shared with other guards (None: a fresh one).
    """

    def __init__(self, enforce: bool, reported: Optional[Reported] = None):
        self.enforce = enforce
        self.seen: Reported = set() if reported is None else reported

    def report(self, findings: Iterable[Finding]) -> None:
        """Log each new warning; raise the new errors (log them, if not enforced)."""
        errors: List[Finding] = []
        for finding in findings:
            key = (finding.code, finding.message, finding.tensor)
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
        raise refusal(errors)


def refusal(errors: List[Finding]) -> RecipeError:
    """The one error that stops a NAN recipe, listing ``errors``."""
    lines = "\n".join(f"  {_as_error(f).line()}" for f in errors)
    return RecipeError(
        "mergekit-nan: this recipe cannot be merged as written; nothing was written "
        f"(`mergekit-nan check RECIPE` lists every finding):\n{lines}"
    )


def enforced(data: Any) -> bool:
    """Whether a recipe's errors stop it: its merge method is ``nan`` or ``<method>+nan``."""
    method = str(data.get("merge_method", "")) if isinstance(data, dict) else ""
    return method == "nan" or method.endswith("+nan")


def _stock_error(finding: Finding) -> bool:
    return finding.code in STOCK_ONLY_ERRORS


def _as_error(finding: Finding) -> Finding:
    if finding.level == "error":
        return finding
    return Finding(
        "error", finding.code, finding.where, finding.message, finding.fix, finding.tensor
    )
