"""The Markdown report and the JSON of the encoder benchmark.

* Accuracy table per regime, in the style of the merging literature: one row per model
  (the linear probe, the experts, every merge), one column per task and the average, test
  accuracy in percent, mean ± std over seeds; then the average normalized accuracy (each
  task's merged accuracy over its expert's, averaged over tasks).
* Paired differences by seed of the average test accuracy: each NAN variant against its
  baseline and against the best method of the regime (highest mean), with the mean, the
  seeds better/worse and a 95% t interval (none with one seed).
* The premise: each expert's update norm ``||theta - base||`` against its data volume, per
  regime (Spearman over every expert of every seed, and the mean norm per volume).
* Time to build each merged task vector, the chosen ``lambda``, and the float64 checks.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from quality_encoder_experiments import METHODS, NAN_VARIANTS, REFERENCE, Record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "quality_lm"))  # its statistics
from quality_lm_merges import spearman  # noqa: E402

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
CLEAR_GAIN = 0.02
"""An expert 'clearly' beats its probe when its test accuracy is higher by at least this."""


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at the end"


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _interval(values: Sequence[float]) -> str:
    mean = statistics.fmean(values) * 100
    better = sum(v > 0 for v in values)
    worse = sum(v < 0 for v in values)
    if len(values) < 2:
        return f"{mean:+.2f} ({better}/{worse})"
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) * 100 / math.sqrt(len(values))
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] ({better}/{worse})"


class View:
    """Reads a :class:`Record` by regime."""

    def __init__(self, record: Record, tasks: Sequence[str]) -> None:
        self.record, self.tasks = record, list(tasks)

    def regimes(self) -> List[str]:
        return sorted({k[0] for k in self.record.accuracy}, key=("epochs", "steps").index)

    def seeds(self, regime: str) -> List[int]:
        return sorted({k[1] for k in self.record.accuracy if k[0] == regime})

    def acc(self, regime: str, seed: int, model: str, task: str) -> float:
        return self.record.accuracy[(regime, seed, model, task, "test")]

    def average(self, regime: str, seed: int, model: str) -> float:
        return statistics.fmean(self.acc(regime, seed, model, t) for t in self.tasks)

    def normalized(self, regime: str, seed: int, model: str) -> float:
        return statistics.fmean(
            self.acc(regime, seed, model, t) / max(self.acc(regime, seed, "expert", t), 1e-9)
            for t in self.tasks
        )

    def best(self, regime: str) -> str:
        seeds = self.seeds(regime)
        return max(
            METHODS, key=lambda m: statistics.fmean(self.average(regime, s, m) for s in seeds)
        )


def accuracy_table(view: View, regime: str) -> str:
    seeds = view.seeds(regime)
    lines = [
        "| model | " + " | ".join(view.tasks) + " | average | normalized |",
        "|---" * (len(view.tasks) + 3) + "|",
    ]
    for model in ("probe", "expert", *METHODS):
        cells = [_ms([view.acc(regime, s, model, t) for s in seeds]) for t in view.tasks]
        cells.append(_ms([view.average(regime, s, model) for s in seeds]))
        normalized = (
            "-" if model == "expert" else _ms([view.normalized(regime, s, model) for s in seeds])
        )
        label = {"probe": "linear probe (frozen base)", "expert": "experts (each on its task)"}
        lines.append(f"| {label.get(model, model)} | " + " | ".join(cells) + f" | {normalized} |")
    return "\n".join(lines)


def paired_table(view: View) -> str:
    regimes = view.regimes()
    lines = ["| pair | " + " | ".join(regimes) + " |", "|---" * (len(regimes) + 1) + "|"]
    rows: List[Tuple[str, List[str]]] = []
    for variant in NAN_VARIANTS:
        cells = []
        for regime in regimes:
            seeds = view.seeds(regime)
            diffs = [
                view.average(regime, s, variant) - view.average(regime, s, REFERENCE[variant])
                for s in seeds
            ]
            cells.append(_interval(diffs))
        rows.append((f"{variant} vs {REFERENCE[variant]}", cells))
    for variant in NAN_VARIANTS:
        cells = []
        for regime in regimes:
            best = view.best(regime)
            seeds = view.seeds(regime)
            diffs = [
                view.average(regime, s, variant) - view.average(regime, s, best) for s in seeds
            ]
            cells.append(f"{_interval(diffs)} vs {best}")
        rows.append((f"{variant} vs the best method", cells))
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def premise_table(view: View) -> str:
    record = view.record
    lines = ["| regime | volume | steps | update norm (mean ± std) | Spearman(norm, volume) |"]
    lines.append("|---|---|---|---|---|")
    for regime in view.regimes():
        entries = [v for k, v in record.norms.items() if k[0] == regime]
        rho = spearman([e[0] for e in entries], [e[1] for e in entries])
        for volume in sorted({e[0] for e in entries}):
            norms = [e[1] for e in entries if e[0] == volume]
            steps = sorted({e[2] for e in entries if e[0] == volume})
            lines.append(
                f"| {regime} | {volume} | {'/'.join(map(str, steps))} | "
                f"{_ms(norms, 1.0, 3)} | {rho:+.2f} |"
            )
    return "\n".join(lines)


def cost_table(view: View) -> str:
    record = view.record
    regimes = view.regimes()
    header = " | ".join(f"{r}: seconds | {r}: lambda" for r in regimes)
    lines = [f"| method | {header} | float64 check |", "|---" * (2 * len(regimes) + 2) + "|"]
    for method in METHODS:
        cells = []
        for regime in regimes:
            seeds = view.seeds(regime)
            cells.append(_ms([record.seconds[(regime, s, method)] for s in seeds], 1.0, 2))
            cells.append("/".join(f"{record.lam[(regime, s, method)]:g}" for s in seeds))
        deviations = [v for k, v in record.deviation.items() if k[2] == method]
        check = f"{max(deviations):.1e}" if deviations else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {check} |")
    return "\n".join(lines)


def expert_gaps(view: View) -> Tuple[str, List[str]]:
    """Each expert's test accuracy minus its probe's; the ones below :data:`CLEAR_GAIN`."""
    lines = ["| regime | " + " | ".join(view.tasks) + " |", "|---" * (len(view.tasks) + 1) + "|"]
    short = []
    for regime in view.regimes():
        cells = []
        for task in view.tasks:
            gaps = [
                view.acc(regime, s, "expert", task) - view.acc(regime, s, "probe", task)
                for s in view.seeds(regime)
            ]
            cells.append(_ms(gaps))
            short += [
                f"{regime}/{task}/seed {s}"
                for s, g in zip(view.seeds(regime), gaps)
                if g < CLEAR_GAIN
            ]
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines), short


def report(record: Record, tasks: Sequence[str], header: Dict[str, object]) -> str:
    view = View(record, tasks)
    parts = [
        f"## Encoder quality (size {header['size']}), {header['machine']}, "
        f"torch threads: {header['threads']}, seeds: {header['seeds']}, "
        f"wall time {header['wall_s']:.0f} s, mergekit-pytorch merges: {header['merges']}",
        "",
        f"Examples per task (train/validation/test pools): {header['pools']}; "
        f"settings: {header['settings']}.",
    ]
    for regime in view.regimes():
        parts += ["", f"### Test accuracy (%), regime {regime}", "", accuracy_table(view, regime)]
    gaps, short = expert_gaps(view)
    verdict = (
        f"every expert beats its linear probe by at least {CLEAR_GAIN * 100:.0f} points"
        if not short
        else f"experts that do NOT beat their probe by {CLEAR_GAIN * 100:.0f} points: "
        + ", ".join(short)
    )
    parts += ["", "### Experts against their linear probe (points)", "", gaps, "", verdict]
    parts += ["", "### Paired by seed: average test accuracy difference (points)", ""]
    parts += [paired_table(view), "", "### Premise: update norm against data volume", ""]
    parts += [premise_table(view), "", "### Time to build the merged task vector, lambda", ""]
    parts += [cost_table(view)]
    return "\n".join(parts)


def to_json(record: Record, tasks: Sequence[str], header: Dict[str, object]) -> Dict[str, object]:
    def rows(mapping, names):
        return [dict(zip(names, (*key, value))) for key, value in mapping.items()]

    return {
        "header": header,
        "tasks": list(tasks),
        "accuracy": rows(record.accuracy, ("regime", "seed", "model", "task", "split", "value")),
        "lambda": rows(record.lam, ("regime", "seed", "method", "value")),
        "curve": rows(record.curve, ("regime", "seed", "method", "points")),
        "seconds": rows(record.seconds, ("regime", "seed", "method", "value")),
        "norms": rows(record.norms, ("regime", "seed", "task", "volume_norm_steps")),
        "deviation": rows(record.deviation, ("regime", "seed", "method", "value")),
        "train_seconds": rows(record.train_seconds, ("regime", "seed", "value")),
    }


def from_json(payloads: Sequence[Dict[str, object]]) -> Tuple[Record, List[str], Optional[Dict]]:
    """Join the records of several runs (e.g. seeds run one after another)."""
    record = Record()
    tasks: List[str] = []
    header = None
    for payload in payloads:
        tasks = list(payload["tasks"])
        if header is None:
            header = dict(payload["header"])
        else:  # one header for the joined runs: their seeds, wall times and merges add up
            for key in ("seeds", "wall_s", "merges"):
                header[key] += payload["header"][key]
            header["settings"] = {**header["settings"], "seeds": header["seeds"]}
        for row in payload["accuracy"]:
            key = (row["regime"], row["seed"], row["model"], row["task"], row["split"])
            record.accuracy[key] = row["value"]
        for name, target in (("lambda", record.lam), ("seconds", record.seconds)):
            for row in payload[name]:
                target[(row["regime"], row["seed"], row["method"])] = row["value"]
        for row in payload["deviation"]:
            record.deviation[(row["regime"], row["seed"], row["method"])] = row["value"]
        for row in payload["curve"]:
            record.curve[(row["regime"], row["seed"], row["method"])] = row["points"]
        for row in payload["norms"]:
            record.norms[(row["regime"], row["seed"], row["task"])] = tuple(
                row["volume_norm_steps"]
            )
        for row in payload["train_seconds"]:
            record.train_seconds[(row["regime"], row["seed"])] = row["value"]
    return record, tasks, header
