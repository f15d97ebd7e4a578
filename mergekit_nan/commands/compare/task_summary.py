"""What ``mergekit-nan compare --task`` found in each task's deciding metric.

The same statistics as for nats/token (:mod:`~mergekit_nan.commands.compare.summary`),
on each document's value of the task's deciding metric (a mean over documents,
so :class:`~mergekit_nan.evaluation.DocumentLosses` with one "token" per
document): the value, its 95 % bootstrap interval, the paired bootstrap
difference from the baseline, the half-split pick with more than two merged
candidates, and the regime reading of an exponent sweep. lm-eval's
``higher_is_better`` decides what "beats" means. Task ``t`` (0-based, in the
order of the output) draws from the random streams of file index
``TASK_STREAMS + t``. The first task decides which model to use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from mergekit_nan.commands.compare.candidates import Candidate
from mergekit_nan.commands.compare.summary import (
    BOOTSTRAP_STREAM,
    REPORT_STREAM,
    SPLIT_STREAM,
    Decision,
    Difference,
    Pick,
    Score,
    Summary,
    decide,
    difference,
    random_stream,
    regime_reading,
)
from mergekit_nan.commands.compare.tasks import PlannedTask, TaskScores
from mergekit_nan.evaluation import DocumentLosses, half_split, interval, pick, resampled_sums

__all__ = ["TASK_STREAMS", "TaskResult", "summarize_task", "with_tasks"]

TASK_STREAMS = 1000
"""Task t's random streams are those of file index ``TASK_STREAMS + t``."""


@dataclass(frozen=True)
class TaskResult:
    """One task: per candidate its value, interval, difference and lm-eval aggregates."""

    task: PlannedTask
    scores: Tuple[Score, ...]
    differences: Tuple[Difference, ...]
    aggregates: Tuple[Dict[str, float], ...]
    values: Tuple[Tuple[float, ...], ...]
    pick: Pick
    regime: Optional[str]
    decision: Decision


def summarize_task(
    candidates: Sequence[Candidate],
    baseline: int,
    task: PlannedTask,
    values: torch.Tensor,
    aggregates: Sequence[Dict[str, float]],
    *,
    seed: int,
    resamples: int,
    index: int,
) -> TaskResult:
    """The statistics of the module docstring for ``values`` ``(candidates, documents)``."""
    better = task.metric.higher_is_better
    sign = -1.0 if better else 1.0
    stream = TASK_STREAMS + index
    documents = values.shape[-1]
    stacked = DocumentLosses(values.to(torch.float64), torch.ones(documents, dtype=torch.long))
    nll, count = resampled_sums(stacked, resamples, random_stream(seed, BOOTSTRAP_STREAM, stream))
    draws = nll / count
    means = stacked.loss()
    scores = tuple(Score(float(means[c]), *interval(draws[c])) for c in range(len(candidates)))
    differences = tuple(
        difference(draws[c] - draws[baseline], float(means[c] - means[baseline]), better)
        for c in range(len(candidates))
    )
    merged = [i for i, c in enumerate(candidates) if c.merged]
    if len(merged) > 2 and documents >= 2:
        selection, report = half_split(documents, random_stream(seed, SPLIT_STREAM, stream))
        oriented = DocumentLosses(sign * stacked.nll, stacked.tokens)
        chosen = pick([oriented.subset(selection)], merged)
        reported = stacked.subset(report)
        rn, rc = resampled_sums(reported, resamples, random_stream(seed, REPORT_STREAM, stream))
        rm = reported.loss()
        found = difference(rn[chosen] / rc - rn[baseline] / rc, float(rm[chosen] - rm[baseline]),
                            better)  # fmt: skip
        chosen_pick = Pick(chosen, True, (found,), found, (tuple(selection.tolist()),))
    else:
        chosen_pick = Pick(0, False, (differences[0],), differences[0])
    unit = task.metric.name
    return TaskResult(
        task,
        scores,
        differences,
        tuple(aggregates),
        tuple(tuple(float(v) for v in row) for row in values),
        chosen_pick,
        regime_reading(candidates, baseline, sign * draws, sign * means, unit=unit, sign=sign),
        decide(candidates, baseline, chosen_pick, f"{task.name} {unit}", unit),
    )


def with_tasks(summary: Summary, scores: Sequence[TaskScores]) -> Summary:
    """``summary`` with every planned task's result; the first task decides."""
    plan = summary.prepared.tasks
    if plan is None or not plan.tasks:
        return summary
    results = tuple(
        summarize_task(
            summary.candidates,
            summary.baseline,
            task,
            torch.stack([s.values[t] for s in scores]),
            [s.aggregates[t] for s in scores],
            seed=summary.settings_seed,
            resamples=summary.resamples,
            index=t,
        )
        for t, task in enumerate(plan.tasks)
    )
    groups = {g: tuple(s.groups.get(g, {}) for s in scores) for g in plan.groups}
    groups = {g: rows for g, rows in groups.items() if any(rows)}
    return dataclasses.replace(summary, tasks=results, groups=groups, decision=results[0].decision)
