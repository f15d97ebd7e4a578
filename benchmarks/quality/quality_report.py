"""Tables of the quality benchmark: the record of a run and its markdown and JSON views."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from quality_data import Settings
from scipy.stats import spearmanr


@dataclass
class Record:
    """Accuracies per (experiment, protocol, method, task) and coefficient statistics.

    Coefficient statistics are keyed by (experiment, protocol, granularity, nan_norm).
    """

    accuracies: Dict[Tuple[str, str, str, str], List[float]] = field(default_factory=dict)
    spearman: Dict[Tuple[str, str, str, str], List[float]] = field(default_factory=dict)
    points: Dict[Tuple[str, str, str, str], List[Tuple[float, float]]] = field(default_factory=dict)

    def add_accuracy(self, key: Tuple[str, str, str, str], value: float) -> None:
        self.accuracies.setdefault(key, []).append(value)

    def add_coefficients(
        self,
        key: Tuple[str, str, str, str],
        coefficients: Sequence[float],
        volumes: Sequence[int],
    ) -> None:
        rho = spearmanr(coefficients, volumes).statistic
        self.spearman.setdefault(key, []).append(float(rho))
        self.points.setdefault(key, []).extend(
            (c * len(volumes), float(v)) for c, v in zip(coefficients, volumes)
        )


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def accuracy_table(record: Record, experiment: str, protocol: str) -> List[str]:
    """Markdown rows: per-task and average accuracy (%) as mean ± std over seeds."""
    keys = [k for k in record.accuracies if k[0] == experiment and k[1] == protocol]
    methods = list(dict.fromkeys(k[2] for k in keys))
    tasks = list(dict.fromkeys(k[3] for k in keys))
    lines = [
        "| method | " + " | ".join(tasks) + " | average |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for method in methods:
        per_task = [record.accuracies[(experiment, protocol, method, t)] for t in tasks]
        averages = [statistics.fmean(values) for values in zip(*per_task)]
        cells = [_cell(values) for values in per_task] + [_cell(averages)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _cell(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def paired_table(record: Record) -> List[str]:
    """Markdown rows: average-accuracy difference to a reference merge, paired by seed."""
    pairs = [
        ("nan (delta, p=1) [default]", "task arithmetic (uniform)"),
        ("nan (delta, p=2)", "task arithmetic (uniform)"),
        ("nan (weights, p=1)", "task arithmetic (uniform)"),
        ("nan (weights, p=2)", "task arithmetic (uniform)"),
        ("nan per layer (delta, p=1)", "task arithmetic (uniform)"),
        ("nan per model (delta, p=1)", "task arithmetic (uniform)"),
        ("nan per layer (weights, p=1)", "task arithmetic (uniform)"),
        ("nan per model (weights, p=1)", "task arithmetic (uniform)"),
        ("oracle (weight ~ data volume)", "task arithmetic (uniform)"),
        ("ties+nan", "ties (uniform)"),
    ]
    settings = list(dict.fromkeys((k[0], k[1]) for k in record.accuracies))
    lines = [
        "| merge vs reference | " + " | ".join(f"{e}, {p}" for e, p in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for method, reference in pairs:
        cells = []
        for experiment, protocol in settings:
            ours = _average(record, experiment, protocol, method)
            theirs = _average(record, experiment, protocol, reference)
            diff = [100 * (a - b) for a, b in zip(ours, theirs)]
            mean, std = _mean_std(diff)
            wins, losses = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
            cells.append(f"{mean:+.2f} ± {std:.2f} ({wins}/{losses})")
        lines.append(f"| {method} vs {reference} | " + " | ".join(cells) + " |")
    return lines


def _average(record: Record, experiment: str, protocol: str, method: str) -> List[float]:
    per_task = [
        values
        for (e, p, m, _), values in record.accuracies.items()
        if (e, p, m) == (experiment, protocol, method)
    ]
    return [statistics.fmean(values) for values in zip(*per_task)]


def correlation_table(record: Record) -> List[str]:
    """Markdown rows: Spearman between per-model NAN coefficient and data volume."""
    lines = [
        "| experiment | protocol | granularity | x_i | Spearman per merge (mean ± std) "
        "| pooled Spearman | pooled Pearson | n x coefficient: min .. max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rhos in record.spearman.items():
        experiment, protocol, granularity, reading = key
        points = record.points[key]
        scaled, volumes = zip(*points)
        pooled = spearmanr(scaled, volumes).statistic
        pearson = float(np.corrcoef(scaled, volumes)[0, 1])
        mean, std = _mean_std(rhos)
        lines.append(
            f"| {experiment} | {protocol} | {granularity} | {reading} | {mean:+.2f} ± {std:.2f} "
            f"| {pooled:+.2f} | {pearson:+.2f} | {min(scaled):.3f} .. {max(scaled):.3f} |"
        )
    return lines


def machine() -> str:
    """One line describing the machine and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def report(record: Record, settings: Settings, elapsed: float) -> str:
    """The full markdown report: machine line, accuracy tables, correlation table."""
    lines = [
        f"date: {datetime.date.today().isoformat()}; machine: {machine()}",
        f"seeds: {settings.seeds}; wall time: {elapsed:.0f} s; accuracies in %, "
        "mean ± std over seeds",
        "",
    ]
    pairs = list(dict.fromkeys((k[0], k[1]) for k in record.accuracies))
    for experiment, protocol in pairs:
        lines += [f"### {experiment}, protocol {protocol}", ""]
        lines += accuracy_table(record, experiment, protocol) + [""]
    lines += [
        "### Paired by seed: average-accuracy difference in points, mean ± std "
        "(seeds better/worse)",
        "",
    ]
    lines += paired_table(record) + [""]
    lines += ["### NAN coefficient vs training-data volume", ""]
    lines += correlation_table(record)
    return "\n".join(lines)


def to_json(record: Record) -> Dict[str, object]:
    """Machine-readable results (lists of per-seed values)."""
    return {
        "accuracies": [
            {"experiment": e, "protocol": p, "method": m, "task": t, "values": v}
            for (e, p, m, t), v in record.accuracies.items()
        ],
        "spearman": [
            {"experiment": e, "protocol": p, "granularity": g, "nan_norm": r, "values": v}
            for (e, p, g, r), v in record.spearman.items()
        ],
    }
