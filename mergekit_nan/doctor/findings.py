"""What ``mergekit-nan check`` (and the stock-command guard) report about a recipe.

A :class:`Finding` is one observation with a level, a place in the recipe and
a fix. Levels: ``error`` (the merge would fail, or write a broken model),
``warning`` (the merge runs but probably not as the user meant), ``info``
(facts such as the job estimate). ``where`` is a path into the recipe as
written, e.g. ``models[1].parameters.nan_exponet`` or
``slices[0].sources[1].parameters.weight[2].value``; ``tensor`` names the
tensor when the finding comes from resolved per-tensor values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from typing_extensions import Literal, get_args

__all__ = ["LEVELS", "Finding", "Level", "format_findings"]

Level = Literal["error", "warning", "info"]
LEVELS: Tuple[str, ...] = get_args(Level)


@dataclass(frozen=True)
class Finding:
    """One observation about a recipe.

    ``code`` is a stable identifier of the kind of finding (``unknown-parameter``,
    ``forgotten-nan``, ...), for scripts reading ``--json``; ``message`` says
    what is wrong in a full sentence; ``fix`` says what to change (may be None
    for ``info``).
    """

    level: Level
    code: str
    where: str
    message: str
    fix: Optional[str] = None
    tensor: Optional[str] = None

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {self.level!r}")

    def line(self) -> str:
        """One line for a log or a terminal: ``warning: where: message; fix: fix``."""
        place = self.where + (f" [{self.tensor}]" if self.tensor else "")
        text = (
            f"{self.level}: {place}: {self.message}" if place else f"{self.level}: {self.message}"
        )
        return f"{text}; fix: {self.fix}" if self.fix else text

    def to_json(self) -> Dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def format_findings(findings: Sequence[Finding]) -> List[str]:
    """Lines sorted by severity (errors first), in recipe order within a level."""
    order = {level: index for index, level in enumerate(LEVELS)}
    return [f.line() for f in sorted(findings, key=lambda f: order[f.level])]
