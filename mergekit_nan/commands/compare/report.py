"""``mergekit-nan compare``'s output: the table, the verdicts in words, JSON, CSV and a plot.

The JSON (:func:`to_json`) has ``baseline`` (a label) and ``candidates``, each
``{"label", "kind", "recipe" (merged candidates only: the exact recipe merged),
"model" (input candidates only), "files": {FILE: {"nll", "perplexity",
"tokens", "documents", "skipped", "ci95"}}, "overall": {...},
"vs_baseline": {FILE: {"diff", "ci95"}}, "vs_baseline_overall": {...}}`` with
FILE as given on the command line, then ``pick`` (the candidate the verdict is
about, how it was chosen, its differences and, for a half-split pick, the
selection half of each file as positions among the file's scored documents),
``winner`` (the candidate to use: the pick only when it beats the baseline on
the documents that did not choose it, else the baseline), ``decision``
(``measure`` and ``reason``: the last line of the output), ``regime``, ``notes``, ``seed`` and ``bootstrap``.
"""

from __future__ import annotations

import csv
import json
import math
from typing import Any, Dict, List

from mergekit_nan.commands.compare import task_report
from mergekit_nan.commands.compare.summary import Score, Summary

__all__ = ["format_table", "to_json", "verdict_lines", "write_csv", "write_json", "write_plot"]


def format_table(summary: Summary) -> str:
    """Candidates x files (and overall), then tasks: the score [95 %] and the difference from
    the baseline; then the tasks' other metrics without intervals."""
    names = [f.name for f in summary.prepared.files]
    columns = names + (["overall"] if len(names) > 1 else [])
    header = ["candidate"]
    for name in columns:
        header += [f"{name} nats/token [95%]", "vs baseline [95%]"]
    task_header, task_cells = task_report.task_columns(summary)
    rows = [header + task_header]
    for c, candidate in enumerate(summary.candidates):
        row = [candidate.label]
        scores = list(summary.scores[c]) + ([summary.overall[c]] if len(names) > 1 else [])
        diffs = list(summary.differences[c]) + (
            [summary.overall_differences[c]] if len(names) > 1 else []
        )
        for score, difference in zip(scores, diffs):
            row += [score.cell(), "baseline" if c == summary.baseline else difference.cell()]
        rows.append(row + task_cells[c])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    counts = ", ".join(
        f"{f.name}: {len(f.token_ids)} documents, {f.tokens} tokens"
        + (f", {f.skipped} skipped (under 2 tokens)" if f.skipped else "")
        for f in summary.prepared.files
    )
    if summary.tasks:
        counts = "; ".join(part for part in (counts, task_report.task_counts(summary)) if part)
    lines.append(
        f"({counts}; 95% intervals from {summary.resamples} bootstrap resamples of the documents, "
        f"differences paired, seed {summary.settings_seed})"
    )
    others = task_report.other_metrics_table(summary)
    return "\n".join(lines + ([""] + others if others else []))


def verdict_lines(summary: Summary) -> List[str]:
    """The pick's method, one line per file and one overall, in words; the regime; the same
    per task; and last, which model to use and why."""
    return _file_lines(summary) + task_report.task_lines(summary) + [_decision(summary)]


def _file_lines(summary: Summary) -> List[str]:
    chosen = summary.pick
    if chosen is None:
        return []
    name = summary.candidates[chosen.index].label
    baseline = summary.candidates[summary.baseline].label
    lines = []
    if chosen.split:
        lines.append(
            f"Picked {name} as the best of {sum(c.merged for c in summary.candidates)} merges on "
            f"one half of each file's documents (seed {summary.settings_seed}); the differences "
            "below are measured on the other half, so they are not the best of several noises."
        )
        if chosen.index == summary.baseline:
            lines.append(f"No merge beat {baseline} on the selection half.")
            return lines + ([summary.regime] if summary.regime else [])
    files = summary.prepared.files
    for held_out, difference in zip(files, chosen.files):
        lines.append(task_report.sentence(name, baseline, f"on {held_out.name}", difference))
    if len(files) > 1:
        lines.append(task_report.sentence(name, baseline, "overall", chosen.overall))
    if summary.regime:
        lines.append(summary.regime)
    return lines


def _decision(summary: Summary) -> str:
    return summary.decision.reason


def _score_json(score: Score, tokens: int, documents: int, skipped: int) -> Dict[str, Any]:
    return {
        "nll": score.loss,
        "perplexity": math.exp(score.loss),
        "tokens": tokens,
        "documents": documents,
        "skipped": skipped,
        "ci95": [score.low, score.high],
    }


def to_json(summary: Summary) -> Dict[str, Any]:
    """The comparison as the mapping of the module docstring."""
    files = summary.prepared.files
    tokens = sum(f.tokens for f in files)
    documents = sum(len(f.token_ids) for f in files)
    skipped = sum(f.skipped for f in files)
    candidates = []
    for c, candidate in enumerate(summary.candidates):
        entry: Dict[str, Any] = {"label": candidate.label, "kind": candidate.kind}
        if candidate.recipe is not None:
            entry["recipe"] = candidate.recipe
        else:
            entry["model"] = candidate.model
        entry["files"] = {
            f.name: _score_json(s, f.tokens, len(f.token_ids), f.skipped)
            for f, s in zip(files, summary.scores[c])
        }
        if files:
            entry["overall"] = _score_json(summary.overall[c], tokens, documents, skipped)
        entry["vs_baseline"] = {f.name: d.as_json() for f, d in zip(files, summary.differences[c])}
        if files:
            entry["vs_baseline_overall"] = summary.overall_differences[c].as_json()
        if summary.tasks:
            entry.update(task_report.candidate_tasks_json(summary, c))
        candidates.append(entry)
    chosen = summary.pick
    pick: Dict[str, Any] = {}
    if chosen is not None:
        pick = {
            "label": summary.candidates[chosen.index].label,
            "method": "half-split" if chosen.split else "all documents",
            "vs_baseline": {f.name: d.as_json() for f, d in zip(files, chosen.files)},
            "vs_baseline_overall": chosen.overall.as_json(),
        }
    if chosen is not None and chosen.split:
        pick["selection"] = {f.name: list(s) for f, s in zip(files, chosen.selection)}
    notes = []
    if summary.prepared.candidates.dropped:
        notes.append(
            "the baseline drops the weight priors of "
            + ", ".join(summary.prepared.candidates.dropped)
        )
    notes += [f"left out {s}" for s in summary.prepared.candidates.skipped]
    found = {
        "baseline": summary.candidates[summary.baseline].label,
        "candidates": candidates,
        **({"pick": pick} if pick else {}),
        "winner": summary.candidates[summary.winner].label,
        "decision": {"measure": summary.decision.measure, "reason": summary.decision.reason},
        "regime": summary.regime,
        "notes": notes,
        "tokenizer": summary.prepared.tokenizer_model,
        "seed": summary.settings_seed,
        "bootstrap": summary.resamples,
    }
    if summary.tasks:
        found.update(task_report.tasks_json(summary))
    return found


def write_json(path: str, summary: Summary) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(to_json(summary), file, indent=2)
        file.write("\n")


_TASK_COLUMNS = ["metric", "value", "higher_is_better"]


def write_csv(path: str, summary: Summary) -> None:
    """One row per candidate and file (and ``overall``); with tasks, one per task too (its
    value in ``value``, its interval in ``ci95_low``/``ci95_high``)."""
    files = summary.prepared.files
    extra = [""] * len(_TASK_COLUMNS) if summary.tasks else []
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["candidate", "file", "nll", "ci95_low", "ci95_high", "perplexity", "tokens",
             "documents", "diff", "diff_ci95_low", "diff_ci95_high"]
            + (_TASK_COLUMNS if summary.tasks else [])
        )  # fmt: skip
        for c, candidate in enumerate(summary.candidates):
            rows = [
                (f.name, s, d, f.tokens, len(f.token_ids))
                for f, s, d in zip(files, summary.scores[c], summary.differences[c])
            ]
            if files:
                rows.append(
                    ("overall", summary.overall[c], summary.overall_differences[c],
                     sum(f.tokens for f in files), sum(len(f.token_ids) for f in files))
                )  # fmt: skip
            for name, score, difference, tokens, documents in rows:
                writer.writerow(
                    [candidate.label, name, repr(score.loss), repr(score.low), repr(score.high),
                     repr(math.exp(score.loss)), tokens, documents, repr(difference.diff),
                     repr(difference.low), repr(difference.high)] + extra
                )  # fmt: skip
            writer.writerows(task_report.task_csv_rows(summary, c))


def write_plot(path: str, summary: Summary) -> None:
    """Per file and per task a panel: each candidate's score with its 95 % interval (needs
    matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f.name, "nats/token (95% interval)", column)
        for f, column in zip(summary.prepared.files, zip(*summary.scores))
    ] + [(r.task.name, f"{r.task.metric.name} (95% interval)", r.scores) for r in summary.tasks]
    labels = [c.label for c in summary.candidates]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 0.45 * len(labels) + 1.5), squeeze=False
    )
    for axis, (title, xlabel, column) in zip(axes[0], panels):
        losses = [s.loss for s in column]
        errors = [[s.loss - s.low for s in column], [s.high - s.loss for s in column]]
        colors = ["tab:gray" if i == summary.baseline else "tab:blue" for i in range(len(labels))]
        for row, (loss, color) in enumerate(zip(losses, colors)):
            xerr = [[errors[0][row]], [errors[1][row]]]
            axis.errorbar([loss], [row], xerr=xerr, fmt="o", color=color, capsize=3)
        axis.axvline(column[summary.baseline].loss, color="tab:gray", linestyle=":", linewidth=1)
        axis.set_yticks(range(len(labels)), labels)
        axis.invert_yaxis()
        axis.set_xlabel(xlabel)
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
