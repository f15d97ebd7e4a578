"""What ``mergekit-nan compare`` found: losses, intervals, differences, the pick, the regime.

Built by :func:`summarize` from every candidate's document losses with
:mod:`mergekit_nan.evaluation`'s statistics. Random streams, all from
``seed``: one bootstrap stream per file (shared by every candidate, so
differences are paired), one split stream per file (the half-split pick), one
bootstrap stream per file for the report halves. "Overall" pools the
documents of every file: total NLL over total tokens, resampled within each
file (a stratified bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from mergekit_nan.commands.compare.candidates import Candidate
from mergekit_nan.commands.compare.settings import Prepared
from mergekit_nan.evaluation import DocumentLosses, half_split, interval, pick, resampled_sums
from mergekit_nan.parameters import NAN_EXPONENT

__all__ = [
    "BOOTSTRAP_STREAM",
    "REPORT_STREAM",
    "SPLIT_STREAM",
    "Decision",
    "Difference",
    "Pick",
    "Score",
    "Summary",
    "decide",
    "difference",
    "random_stream",
    "regime_reading",
    "summarize",
]

BOOTSTRAP_STREAM, SPLIT_STREAM, REPORT_STREAM = 0, 1, 2
"""The random streams: the bootstrap, the half split, the bootstrap of the report halves."""


def random_stream(seed: int, stream: int, file_index: int) -> torch.Generator:
    """The generator of ``stream`` for file ``file_index`` under ``seed``."""
    return torch.Generator().manual_seed((seed * 7 + stream) * 100_003 + file_index)


@dataclass(frozen=True)
class Score:
    """A loss (nats/token) with its 95 % bootstrap interval."""

    loss: float
    low: float
    high: float

    def cell(self) -> str:
        """The value and its interval, as the table shows them."""
        return f"{self.loss:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Difference:
    """Candidate minus baseline, with its 95 % interval.

    In nats/token a negative difference is better; in a task metric whose
    ``higher_is_better`` (accuracy), a positive one.
    """

    diff: float
    low: float
    high: float
    higher_is_better: bool = False

    @property
    def verdict(self) -> str:
        """``better``, ``worse`` or ``unclear`` (the interval holds 0)."""
        below, above = ("worse", "better") if self.higher_is_better else ("better", "worse")
        if self.high < 0:
            return below
        if self.low > 0:
            return above
        return "unclear"

    def cell(self) -> str:
        """The difference and its interval, as the table shows them."""
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"

    def as_json(self) -> Dict[str, Any]:
        """``{"diff": ..., "ci95": [low, high]}``, as the JSON holds it."""
        return {"diff": self.diff, "ci95": [self.low, self.high]}


@dataclass(frozen=True)
class Pick:
    """The candidate the verdict is about, and its difference from the baseline.

    ``split``: chosen on the selection halves (``selection[f]``: positions among
    file f's scored documents) and measured on the others; else the recipe,
    measured on every document.
    """

    index: int
    split: bool
    files: Tuple[Difference, ...]
    overall: Difference
    selection: Tuple[Tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Decision:
    """Which model to use, and why: the last line of the output.

    ``winner`` is the pick when it clearly beats the baseline on the documents
    that did not choose it (all documents when nothing was chosen among
    several), else the baseline. ``measure`` names what decided ("held-out
    loss", or a task's name and metric).
    """

    winner: int
    measure: str
    reason: str


def decide(
    candidates: Sequence[Candidate], baseline: int, pick: Pick, measure: str, unit: str
) -> Decision:
    """The :class:`Decision` for ``pick``, in ``measure`` (e.g. "held-out loss") and ``unit``."""
    name = candidates[pick.index].label
    base = candidates[baseline].label
    found = pick.overall
    gain = abs(found.diff)
    span = f"{found.diff:+.4f} {unit}, {found.low:+.4f} to {found.high:+.4f}"
    if pick.index == baseline:
        reason = f"Use {base}: no merge beat it in {measure} on the selection half."
        return Decision(baseline, measure, reason)
    if found.verdict == "better":
        where = " on the half of the documents that did not choose it" if pick.split else ""
        reason = f"Use {name}: it beats {base} in {measure}{where} by {gain:.4f} {unit} ({span})."
        return Decision(pick.index, measure, reason)
    verdict = "is worse than it" if found.verdict == "worse" else "does not clearly beat it"
    if pick.split:
        reason = (
            f"Use {base}: {name}, the best merge on one half of the documents, {verdict} in "
            f"{measure} on the other half ({span})."
        )
    else:
        reason = f"Use {base}: {name} {verdict} in {measure} ({span})."
    return Decision(baseline, measure, reason)


@dataclass(frozen=True)
class Summary:
    """Every number of the comparison; ``[candidate][file]`` where indexed twice.

    Without ``--data`` the file statistics are empty and ``pick`` is None;
    ``tasks`` holds a :class:`~mergekit_nan.commands.compare.task_summary.TaskResult`
    per task, ``groups`` each group's lm-eval aggregates per candidate.
    """

    prepared: Prepared
    settings_seed: int
    resamples: int
    scores: Tuple[Tuple[Score, ...], ...]
    overall: Tuple[Score, ...]
    differences: Tuple[Tuple[Difference, ...], ...]
    overall_differences: Tuple[Difference, ...]
    pick: Optional[Pick]
    decision: Decision
    regime: Optional[str]
    tasks: Tuple[Any, ...] = ()
    groups: Dict[str, Tuple[Dict[str, float], ...]] = field(default_factory=dict)

    @property
    def winner(self) -> int:
        """The candidate to use (the pick only when it beats the baseline where it was not chosen)."""
        return self.decision.winner

    @property
    def candidates(self) -> Tuple[Candidate, ...]:
        return self.prepared.candidates.candidates

    @property
    def baseline(self) -> int:
        return self.prepared.candidates.baseline


def _score(nll: torch.Tensor, tokens: torch.Tensor, loss: float) -> Score:
    low, high = interval(nll / tokens)
    return Score(loss, low, high)


def difference(draws: torch.Tensor, diff: float, higher_is_better: bool = False) -> Difference:
    """``diff`` with the 95 % percentile interval of its bootstrap ``draws``."""
    low, high = interval(draws)
    return Difference(diff, low, high, higher_is_better)


def _stacked(losses: Sequence[Sequence[DocumentLosses]], file_index: int) -> DocumentLosses:
    rows = [candidate[file_index] for candidate in losses]
    return DocumentLosses(torch.stack([r.nll for r in rows]), rows[0].tokens)


def _exponent(candidate: Candidate) -> Optional[float]:
    if candidate.kind == "exponent":
        return float(candidate.value)
    if candidate.kind == "recipe" and candidate.recipe is not None:
        value = (candidate.recipe.get("parameters") or {}).get(NAN_EXPONENT.name, 1.0)
        return float(value) if isinstance(value, (int, float)) else None
    return None


def regime_reading(
    candidates: Sequence[Candidate],
    baseline: int,
    draws: torch.Tensor,
    losses: torch.Tensor,
    *,
    unit: str = "nats/token",
    sign: float = 1.0,
) -> Optional[str]:
    """What the exponent sweep says about NAN's premise (None without exponents of both signs).

    ``draws[c]`` are candidate c's bootstrap losses, ``losses[c]`` its loss. The
    lowest exponent (e.g. -1: larger update, larger weight) is set against the
    highest (NAN's 1), with the baseline's equal weights (exponent 0) between
    them: when the baseline clearly beats both, the update sizes say nothing
    about which model to trust, whichever of the two loses less; else the one
    that clearly beats the other names the regime. A metric where higher is
    better comes negated (lower is better here) with ``sign`` -1: differences
    are shown in the metric's own direction, in ``unit``.
    """
    exponents = [(e, i) for i, c in enumerate(candidates) if (e := _exponent(c)) is not None]
    if not any(e < 0 for e, _ in exponents) or not any(e > 0 for e, _ in exponents):
        return None
    low_e, low = min(exponents)
    high_e, high = max(exponents)
    found = difference(draws[low] - draws[high], float(losses[low] - losses[high]))
    shown = sorted((sign * found.low + 0.0, sign * found.high + 0.0))
    between = (
        f"nan_exponent {low_e:g} against {high_e:g}: {sign * found.diff + 0.0:+.4f} {unit} "
        f"({shown[0]:+.4f} to {shown[1]:+.4f})"
    )
    behind = [
        difference(draws[i] - draws[baseline], float(losses[i] - losses[baseline]))
        for i in (high, low)
    ]
    if all(d.verdict == "worse" for d in behind):
        return (
            f"The exponent sweep finds neither regime: {candidates[baseline].label} beats "
            f"nan_exponent {high_e:g} by {behind[0].diff:.4f} and {low_e:g} by "
            f"{behind[1].diff:.4f} {unit} (both clear), so the update sizes do not tell "
            f"which model to trust here; {between}."
        )
    if found.verdict == "better":
        return (
            f"The models look like the other regime: {between}. A larger update deserves a "
            "larger weight here, against NAN's premise that it is the over-fit one."
        )
    if found.verdict == "worse":
        return f"The models look like NAN's regime: {between}."
    return f"The exponent sweep cannot tell the regimes apart: {between}."


def summarize(
    prepared: Prepared, losses: Sequence[Sequence[DocumentLosses]], *, seed: int, resamples: int
) -> Summary:
    """Every statistic of the module docstring, for ``losses[candidate][file]``."""
    candidates = prepared.candidates.candidates
    base = prepared.candidates.baseline
    if not prepared.files:
        empty = ((),) * len(candidates)
        return Summary(
            prepared, seed, resamples, empty, (), empty, (), None, Decision(base, "", ""), None
        )
    files = range(len(prepared.files))
    stacked = [_stacked(losses, f) for f in files]
    drawn = [
        resampled_sums(s, resamples, random_stream(seed, BOOTSTRAP_STREAM, f))
        for s, f in zip(stacked, files)
    ]
    scores, differences = [], []
    for s, (nll, tokens) in zip(stacked, drawn):
        loss = s.loss()
        draws = nll / tokens
        scores.append([_score(nll[c], tokens, float(loss[c])) for c in range(len(candidates))])
        differences.append(
            [
                difference(draws[c] - draws[base], float(loss[c] - loss[base]))
                for c in range(len(candidates))
            ]
        )
    total_nll = sum(n for n, _ in drawn)
    total_tokens = sum(t for _, t in drawn)
    pooled = sum(s.nll.sum(dim=-1) for s in stacked) / sum(s.tokens.sum() for s in stacked)
    pooled_draws = total_nll / total_tokens
    overall = tuple(
        _score(total_nll[c], total_tokens, float(pooled[c])) for c in range(len(candidates))
    )
    overall_differences = tuple(
        difference(pooled_draws[c] - pooled_draws[base], float(pooled[c] - pooled[base]))
        for c in range(len(candidates))
    )
    merged = [i for i, c in enumerate(candidates) if c.merged]
    if len(merged) > 2:
        halves = [
            half_split(s.tokens.numel(), random_stream(seed, SPLIT_STREAM, f))
            for s, f in zip(stacked, files)
        ]
        chosen = pick([s.subset(h[0]) for s, h in zip(stacked, halves)], merged)
        reported = [s.subset(h[1]) for s, h in zip(stacked, halves)]
        report_draws = [
            resampled_sums(r, resamples, random_stream(seed, REPORT_STREAM, f))
            for r, f in zip(reported, files)
        ]
        per_file = []
        for r, (nll, tokens) in zip(reported, report_draws):
            loss = r.loss()
            draws = nll / tokens
            per_file.append(
                difference(draws[chosen] - draws[base], float(loss[chosen] - loss[base]))
            )
        nll = sum(n for n, _ in report_draws)
        tokens = sum(t for _, t in report_draws)
        loss = sum(r.nll.sum(dim=-1) for r in reported) / sum(r.tokens.sum() for r in reported)
        draws = nll / tokens
        whole = difference(draws[chosen] - draws[base], float(loss[chosen] - loss[base]))
        selection = tuple(tuple(int(i) for i in h[0]) for h in halves)
        found = Pick(chosen, True, tuple(per_file), whole, selection)
    else:
        recipe = 0
        found = Pick(
            recipe, False, tuple(d[recipe] for d in differences), overall_differences[recipe]
        )
    return Summary(
        prepared,
        seed,
        resamples,
        tuple(tuple(row[c] for row in scores) for c in range(len(candidates))),
        overall,
        tuple(tuple(row[c] for row in differences) for c in range(len(candidates))),
        overall_differences,
        found,
        decide(candidates, base, found, "held-out loss", "nats/token"),
        regime_reading(candidates, base, pooled_draws, pooled),
    )
