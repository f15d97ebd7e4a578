"""``mergekit-nan compare --task``'s part of the output: columns, lines, JSON, CSV rows.

JSON, per candidate (TASK: lm-eval's task name, also for a task given as a path)::

    "tasks": {TASK: {"metric": "acc", "value": 0.61, "ci95": [0.57, 0.65], "documents": 500,
                     "higher_is_better": true, "other_metrics": {"acc_norm": 0.63},
                     "per_document": [1.0, 0.0, ...]}},
    "vs_baseline_tasks": {TASK: {"diff": 0.012, "ci95": [-0.004, 0.028]}}

``diff`` is the candidate minus the baseline in the task's metric;
``per_document`` follows the top-level ``tasks[TASK]["documents"]`` (ids in
the task's evaluation split). Top level: ``tasks`` (per task its metric, its
direction, its documents, its group, its pick and regime) and ``groups``
(each group's lm-eval aggregates per candidate label, no interval).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from mergekit_nan.commands.compare.summary import Difference, Summary
from mergekit_nan.commands.compare.task_summary import TaskResult

__all__ = [
    "candidate_tasks_json",
    "other_metrics_table",
    "sentence",
    "task_columns",
    "task_csv_rows",
    "task_lines",
    "tasks_json",
]


def sentence(
    name: str, baseline: str, where: str, difference: Difference, unit: str = "nats/token"
) -> str:
    """``difference`` in words: beats, is worse than, or no clear difference."""
    s = 1.0 if difference.higher_is_better else -1.0
    gain = s * difference.diff
    low, high = sorted((s * difference.low, s * difference.high))
    if difference.verdict == "better":
        return f"{name} beats {baseline} {where} by {gain:.4f} {unit} ({low:.4f} to {high:.4f})"
    if difference.verdict == "worse":
        return (
            f"{name} is worse than {baseline} {where} by {-gain:.4f} {unit} "
            f"({-high:.4f} to {-low:.4f})"
        )
    return (
        f"no clear difference between {name} and {baseline} {where} "
        f"({difference.diff:+.4f} {unit}, {difference.low:+.4f} to {difference.high:+.4f})"
    )


def task_columns(summary: Summary) -> Tuple[List[str], List[List[str]]]:
    """The table's column pair per task: header cells, and each candidate's cells."""
    header: List[str] = []
    for result in summary.tasks:
        header += [f"{result.task.name} {result.task.metric.name} [95%]", "vs baseline [95%]"]
    rows = []
    for c in range(len(summary.candidates)):
        row = []
        for result in summary.tasks:
            score, difference = result.scores[c], result.differences[c]
            row += [score.cell(), "baseline" if c == summary.baseline else difference.cell()]
        rows.append(row)
    return header, rows


def task_counts(summary: Summary) -> str:
    """The tasks' documents and metric directions, for the line under the table."""
    parts = []
    for result in summary.tasks:
        task = result.task
        kept = f"{len(task.documents)} of {task.total} documents"
        direction = "higher" if task.metric.higher_is_better else "lower"
        parts.append(f"{task.name}: {kept}, {task.metric.name} ({direction} is better)")
    return "; ".join(parts)


def other_metrics_table(summary: Summary) -> List[str]:
    """The other metrics and group aggregates, as lm-eval computes them, without intervals."""
    columns: List[Tuple[str, int, str]] = []
    for t, result in enumerate(summary.tasks):
        names = [m.name for m in result.task.others]
        columns += [(f"{result.task.name} {n}", t, n) for n in names]
    groups = sorted({(g, m) for g, rows in summary.groups.items() for row in rows for m in row})
    if not columns and not groups:
        return []
    header = ["candidate"] + [c[0] for c in columns] + [f"group {g} {m}" for g, m in groups]
    rows = [header]
    for c, candidate in enumerate(summary.candidates):
        row = [candidate.label]
        for _, t, name in columns:
            value = summary.tasks[t].aggregates[c].get(name)
            row.append("-" if value is None else f"{value:.4f}")
        for group, metric in groups:
            value = summary.groups[group][c].get(metric)
            row.append("-" if value is None else f"{value:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "(lm-eval's aggregates over the same documents: no interval, no part in the pick; "
        "metrics that are not a mean over documents, such as corpus BLEU or F1 or a "
        "perplexity, have none)"
    )
    return lines


def task_lines(summary: Summary) -> List[str]:
    """Per task: the pick's method, its difference in words, and the regime reading."""
    lines = []
    baseline = summary.candidates[summary.baseline].label
    merged = sum(c.merged for c in summary.candidates)
    for result in summary.tasks:
        task, chosen = result.task, result.pick
        name = summary.candidates[chosen.index].label
        where = f"in {task.name} {task.metric.name}"
        if chosen.split:
            lines.append(
                f"Picked {name} as the best of {merged} merges on one half of {task.name}'s "
                f"documents (seed {summary.settings_seed}); the difference below is measured "
                "on the other half."
            )
        if chosen.split and chosen.index == summary.baseline:
            lines.append(f"No merge beat {baseline} {where} on the selection half.")
        else:
            lines.append(sentence(name, baseline, where, chosen.overall, task.metric.name))
        if result.regime:
            lines.append(result.regime)
    return lines


def candidate_tasks_json(summary: Summary, c: int) -> Dict[str, Any]:
    """Candidate ``c``'s ``tasks`` and ``vs_baseline_tasks`` (module docstring)."""
    tasks, differences = {}, {}
    for result in summary.tasks:
        task, score = result.task, result.scores[c]
        tasks[task.name] = {
            "metric": task.metric.name,
            "value": score.loss,
            "ci95": [score.low, score.high],
            "documents": len(task.documents),
            "higher_is_better": task.metric.higher_is_better,
            "other_metrics": {
                k: v for k, v in result.aggregates[c].items() if k != task.metric.name
            },
            "per_document": list(result.values[c]),
        }
        differences[task.name] = result.differences[c].as_json()
    return {"tasks": tasks, "vs_baseline_tasks": differences}


def _pick_json(summary: Summary, result: TaskResult) -> Dict[str, Any]:
    chosen = result.pick
    found: Dict[str, Any] = {
        "label": summary.candidates[chosen.index].label,
        "method": "half-split" if chosen.split else "all documents",
        "vs_baseline": chosen.overall.as_json(),
    }
    if chosen.split:
        found["selection"] = list(chosen.selection[0])
    return found


def tasks_json(summary: Summary) -> Dict[str, Any]:
    """The top-level ``tasks`` and ``groups`` (module docstring)."""
    labels = [c.label for c in summary.candidates]
    return {
        "tasks": {
            r.task.name: {
                "metric": r.task.metric.name,
                "higher_is_better": r.task.metric.higher_is_better,
                "documents": list(r.task.documents),
                "total_documents": r.task.total,
                "group": r.task.group,
                "pick": _pick_json(summary, r),
                "regime": r.regime,
            }
            for r in summary.tasks
        },
        "groups": {g: dict(zip(labels, rows)) for g, rows in summary.groups.items()},
    }


def task_csv_rows(summary: Summary, c: int) -> Sequence[List[Any]]:
    """Candidate ``c``'s CSV rows, one per task (the value in ``value``, no nll)."""
    rows = []
    for result in summary.tasks:
        score, difference = result.scores[c], result.differences[c]
        task = result.task
        rows.append(
            [summary.candidates[c].label, task.name, "", repr(score.low), repr(score.high), "", "",
             len(task.documents), repr(difference.diff), repr(difference.low),
             repr(difference.high), task.metric.name, repr(score.loss),
             task.metric.higher_is_better]
        )  # fmt: skip
    return rows
