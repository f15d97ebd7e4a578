"""Quality benchmark: do NAN coefficients track training-data volume, and does merging improve?

Real data shipped with scikit-learn (digits, wine, breast cancer, iris). A small
MLP backbone is pre-trained on a disjoint slice of all four tasks; copies are
then fine-tuned with deliberately different data volumes and merged through
mergekit's ``merge_state_dicts`` (the same kernels ``mergekit-yaml`` runs).

Two experiments per fine-tuning protocol:

* ``multi-task``: one fine-tune per task, each on a different fraction of its
  training split (the fractions are shuffled across tasks per seed). The
  backbone is merged; every task keeps its own classification head.
* ``same-task``: per dataset, three fine-tunes on 5%, 20% and 100% of the
  training split; the whole model (backbone and head) is merged.

Two protocols: ``steps`` (every fine-tune takes the same number of optimiser
steps) and ``epochs`` (the same number of passes, so steps grow with data).

Merges compared at the same total scale (weights summing to one, lambda 1):
task arithmetic with uniform weights, the oracle (weights proportional to the
true number of training examples), ``nan`` in its four readings
(``nan_norm`` delta/weights x ``nan_exponent`` 1/2), ``ties`` and ``ties+nan``.

Run: ``python benchmarks/quality.py`` (about two minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mergekit.merge_methods  # noqa: F401  (mergekit first: the plugin registers on import)
import numpy as np
import torch
from mergekit.merge_methods.api import merge_state_dicts
from scipy.stats import spearmanr
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import mergekit_nan  # noqa: F401  (registers nan and <method>+nan)
from mergekit_nan.coefficients import tensor_coefficients

State = Dict[str, torch.Tensor]

LOADERS: Dict[str, Callable] = {
    "digits": datasets.load_digits,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "iris": datasets.load_iris,
}
INPUT_DIM = 64
"""Every task's standardised features are zero-padded to this width (digits has 64)."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    seeds: int
    hidden: int
    pretrain_steps: int
    finetune_steps: int
    finetune_epochs: int
    batch_size: int
    learning_rate: float
    pretrain_fraction: float
    multi_fractions: Tuple[float, ...]
    same_fractions: Tuple[float, ...]
    ties_density: float


SIZES: Dict[str, Settings] = {
    "full": Settings(
        seeds=10,
        hidden=128,
        pretrain_steps=100,
        finetune_steps=300,
        finetune_epochs=20,
        batch_size=32,
        learning_rate=1e-3,
        pretrain_fraction=0.1,
        multi_fractions=(0.05, 0.2, 0.5, 1.0),
        same_fractions=(0.05, 0.2, 1.0),
        ties_density=0.5,
    ),
    "tiny": Settings(
        seeds=2,
        hidden=32,
        pretrain_steps=40,
        finetune_steps=20,
        finetune_epochs=2,
        batch_size=32,
        learning_rate=1e-3,
        pretrain_fraction=0.2,
        multi_fractions=(0.05, 0.2, 0.5, 1.0),
        same_fractions=(0.05, 0.2, 1.0),
        ties_density=0.5,
    ),
}


@dataclass
class Task:
    """One dataset, split into pre-training, fine-tuning and test parts."""

    name: str
    classes: int
    pretrain: Tuple[torch.Tensor, torch.Tensor]
    finetune: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A merge recipe: mergekit method name plus parameters given the data volumes."""

    label: str
    name: str
    parameters: Callable[[Sequence[int]], Dict[str, object]]


def _uniform(volumes: Sequence[int]) -> List[float]:
    return [1.0 / len(volumes)] * len(volumes)


def _oracle(volumes: Sequence[int]) -> List[float]:
    total = float(sum(volumes))
    return [v / total for v in volumes]


def merge_recipes(density: float) -> List[Method]:
    """The merges compared, all at total weight one and lambda one."""
    return [
        Method("task arithmetic (uniform)", "task_arithmetic", lambda v: {"weight": _uniform(v)}),
        Method(
            "oracle (weight ~ data volume)", "task_arithmetic", lambda v: {"weight": _oracle(v)}
        ),
        Method("nan (delta, p=1) [default]", "nan", lambda v: {}),
        Method("nan (delta, p=2)", "nan", lambda v: {"nan_exponent": 2.0}),
        Method("nan (weights, p=1)", "nan", lambda v: {"nan_norm": "weights"}),
        Method("nan (weights, p=2)", "nan", lambda v: {"nan_norm": "weights", "nan_exponent": 2.0}),
        Method("ties (uniform)", "ties", lambda v: {"weight": 1.0, "density": density}),
        Method("ties+nan", "ties+nan", lambda v: {"density": density}),
    ]


NAN_READINGS: Dict[str, Tuple[str, float]] = {
    "delta": ("delta", 1.0),
    "weights": ("weights", 1.0),
}


def load_tasks(seed: int, pretrain_fraction: float) -> List[Task]:
    """Stratified test / pre-train / fine-tune splits of every dataset for ``seed``."""
    tasks = []
    for name, loader in LOADERS.items():
        data = loader()
        x, y = data.data.astype(np.float32), data.target.astype(np.int64)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=0.3, stratify=y, random_state=seed
        )
        x_ft, x_pre, y_ft, y_pre = train_test_split(
            x_rest, y_rest, test_size=pretrain_fraction, stratify=y_rest, random_state=seed
        )
        scaler = StandardScaler().fit(x_rest)
        tasks.append(
            Task(
                name=name,
                classes=int(y.max()) + 1,
                pretrain=_tensors(scaler.transform(x_pre), y_pre),
                finetune=_tensors(scaler.transform(x_ft), y_ft),
                test=_tensors(scaler.transform(x_test), y_test),
            )
        )
    return tasks


def _tensors(x: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    padded = np.zeros((x.shape[0], INPUT_DIM), dtype=np.float32)
    padded[:, : x.shape[1]] = x
    return torch.from_numpy(padded), torch.from_numpy(y)


def subsample(
    data: Tuple[torch.Tensor, torch.Tensor], fraction: float, classes: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stratified ``fraction`` of ``data`` with at least two examples per class."""
    x, y = data
    if fraction >= 1.0:
        return x, y
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in range(classes):
        rows = torch.nonzero(y == label).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        count = min(rows.numel(), max(2, round(fraction * rows.numel())))
        keep.append(rows[:count])
    index = torch.cat(keep)
    return x[index], y[index]


def backbone(hidden: int) -> nn.Sequential:
    """The shared part of every model: two ReLU layers over the padded features."""
    return nn.Sequential(
        nn.Linear(INPUT_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
    )


def _train(
    body: nn.Module,
    heads: Dict[str, nn.Linear],
    batches: Sequence[Tuple[str, torch.Tensor, torch.Tensor]],
    learning_rate: float,
) -> None:
    parameters = list(body.parameters()) + [p for h in heads.values() for p in h.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    for name, x, y in batches:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(heads[name](body(x)), y).backward()
        optimiser.step()


def _batches(
    name: str,
    data: Tuple[torch.Tensor, torch.Tensor],
    steps: Optional[int],
    epochs: Optional[int],
    batch_size: int,
    generator: torch.Generator,
) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Mini-batches: ``steps`` random batches, or ``epochs`` shuffled passes."""
    x, y = data
    n = x.shape[0]
    out = []
    if steps is not None:
        for _ in range(steps):
            index = torch.randint(n, (min(batch_size, n),), generator=generator)
            out.append((name, x[index], y[index]))
        return out
    for _ in range(epochs or 0):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            out.append((name, x[index], y[index]))
    return out


@dataclass
class Pretrained:
    """The shared starting point: a backbone plus one head per task."""

    body: State
    heads: Dict[str, State]


def pretrain(tasks: Sequence[Task], settings: Settings, seed: int) -> Pretrained:
    """Multi-task pre-training on the disjoint pre-training slices (tasks interleaved)."""
    torch.manual_seed(seed)
    body = backbone(settings.hidden)
    heads = {t.name: nn.Linear(settings.hidden, t.classes) for t in tasks}
    generator = torch.Generator().manual_seed(seed)
    per_task = [
        _batches(t.name, t.pretrain, settings.pretrain_steps, None, settings.batch_size, generator)
        for t in tasks
    ]
    interleaved = [batch for step in zip(*per_task) for batch in step]
    _train(body, heads, interleaved, settings.learning_rate)
    return Pretrained(
        body=_clone(body.state_dict()),
        heads={name: _clone(head.state_dict()) for name, head in heads.items()},
    )


def _clone(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class FineTune:
    """One fine-tuned copy: its backbone, head, task and number of training examples."""

    task: str
    volume: int
    body: State
    head: State


def finetune(
    start: Pretrained,
    task: Task,
    fraction: float,
    protocol: str,
    settings: Settings,
    seed: int,
) -> FineTune:
    """Fine-tune backbone and head of ``task`` on ``fraction`` of its fine-tuning split."""
    data = subsample(task.finetune, fraction, task.classes, seed)
    torch.manual_seed(seed)
    body = backbone(settings.hidden)
    body.load_state_dict(start.body)
    head = nn.Linear(settings.hidden, task.classes)
    head.load_state_dict(start.heads[task.name])
    generator = torch.Generator().manual_seed(seed)
    steps = settings.finetune_steps if protocol == "steps" else None
    epochs = settings.finetune_epochs if protocol == "epochs" else None
    batches = _batches(task.name, data, steps, epochs, settings.batch_size, generator)
    _train(body, {task.name: head}, batches, settings.learning_rate)
    return FineTune(
        task.name, int(data[0].shape[0]), _clone(body.state_dict()), _clone(head.state_dict())
    )


@torch.no_grad()
def accuracy(
    body: State, head: State, data: Tuple[torch.Tensor, torch.Tensor], hidden: int
) -> float:
    """Test accuracy of a backbone and head given as state dicts."""
    model = backbone(hidden)
    model.load_state_dict(body)
    linear = nn.Linear(hidden, head["weight"].shape[0])
    linear.load_state_dict(head)
    x, y = data
    return float((linear(model(x)).argmax(dim=1) == y).float().mean())


def merge(method: Method, base: State, models: Sequence[State], volumes: Sequence[int]) -> State:
    """Merge ``models`` onto ``base`` through mergekit's in-process API."""
    inputs = {"base": base, **{f"m{i}": m for i, m in enumerate(models)}}
    parameters = method.parameters(volumes)
    weight = parameters.get("weight")
    if isinstance(weight, list):
        parameters = {**parameters, "weight": {f"m{i}": w for i, w in enumerate(weight)}}
    with torch.no_grad():
        return merge_state_dicts(inputs, method.name, parameters=parameters, base="base")


def model_coefficients(base: State, models: Sequence[State], nan_norm: str) -> List[float]:
    """Per-model NAN coefficient (p=1), averaged over the tensors of the state dicts."""
    rows = [
        tensor_coefficients([m[name] for m in models], base[name] if nan_norm == "delta" else None)
        for name in base
    ]
    return torch.stack(rows).mean(dim=0).tolist()


@dataclass
class Record:
    """Accuracies per (experiment, protocol, method, task) and coefficient statistics."""

    accuracies: Dict[Tuple[str, str, str, str], List[float]] = field(default_factory=dict)
    spearman: Dict[Tuple[str, str, str], List[float]] = field(default_factory=dict)
    points: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = field(default_factory=dict)

    def add_accuracy(self, key: Tuple[str, str, str, str], value: float) -> None:
        self.accuracies.setdefault(key, []).append(value)

    def add_coefficients(
        self, key: Tuple[str, str, str], coefficients: Sequence[float], volumes: Sequence[int]
    ) -> None:
        rho = spearmanr(coefficients, volumes).statistic
        self.spearman.setdefault(key, []).append(float(rho))
        self.points.setdefault(key, []).extend(
            (c * len(volumes), float(v)) for c, v in zip(coefficients, volumes)
        )


def run_multi_task(
    tasks: Sequence[Task],
    start: Pretrained,
    protocol: str,
    settings: Settings,
    seed: int,
    record: Record,
) -> None:
    """One fine-tune per task on shuffled data fractions; merge the backbone only."""
    order = np.random.default_rng(seed).permutation(len(settings.multi_fractions))
    fractions = [settings.multi_fractions[i] for i in order]
    tunes = [
        finetune(start, task, fraction, protocol, settings, seed * 100 + i)
        for i, (task, fraction) in enumerate(zip(tasks, fractions))
    ]
    volumes = [t.volume for t in tunes]
    bodies = [t.body for t in tunes]
    experiment = "multi-task"
    for task, tune in zip(tasks, tunes):
        ref = accuracy(start.body, tune.head, task.test, settings.hidden)
        record.add_accuracy((experiment, protocol, "pretrained backbone", task.name), ref)
        own = accuracy(tune.body, tune.head, task.test, settings.hidden)
        record.add_accuracy((experiment, protocol, "fine-tuned alone", task.name), own)
    for method in merge_recipes(settings.ties_density):
        merged = merge(method, start.body, bodies, volumes)
        for task, tune in zip(tasks, tunes):
            score = accuracy(merged, tune.head, task.test, settings.hidden)
            record.add_accuracy((experiment, protocol, method.label, task.name), score)
    for reading in NAN_READINGS:
        coefficients = model_coefficients(start.body, bodies, reading)
        record.add_coefficients((experiment, protocol, reading), coefficients, volumes)


def _whole(body: State, head: State) -> State:
    return {
        **{f"body.{k}": v for k, v in body.items()},
        **{f"head.{k}": v for k, v in head.items()},
    }


def _split(state: State) -> Tuple[State, State]:
    body = {k[5:]: v for k, v in state.items() if k.startswith("body.")}
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    return body, head


def run_same_task(
    tasks: Sequence[Task],
    start: Pretrained,
    protocol: str,
    settings: Settings,
    seed: int,
    record: Record,
) -> None:
    """Per task, fine-tunes on growing fractions of its data; merge backbone and head."""
    experiment = "same-task"
    for t_index, task in enumerate(tasks):
        base = _whole(start.body, start.heads[task.name])
        tunes = [
            finetune(start, task, fraction, protocol, settings, seed * 100 + 10 * t_index + i)
            for i, fraction in enumerate(settings.same_fractions)
        ]
        volumes = [t.volume for t in tunes]
        wholes = [_whole(t.body, t.head) for t in tunes]
        record.add_accuracy(
            (experiment, protocol, "pretrained", task.name),
            accuracy(start.body, start.heads[task.name], task.test, settings.hidden),
        )
        for fraction, tune in zip(settings.same_fractions, tunes):
            label = f"fine-tuned alone on {fraction:.0%}"
            score = accuracy(tune.body, tune.head, task.test, settings.hidden)
            record.add_accuracy((experiment, protocol, label, task.name), score)
        for method in merge_recipes(settings.ties_density):
            body, head = _split(merge(method, base, wholes, volumes))
            score = accuracy(body, head, task.test, settings.hidden)
            record.add_accuracy((experiment, protocol, method.label, task.name), score)
        for reading in NAN_READINGS:
            coefficients = model_coefficients(base, wholes, reading)
            record.add_coefficients((experiment, protocol, reading), coefficients, volumes)


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
        "| experiment | protocol | x_i | Spearman per merge (mean ± std) | pooled Spearman "
        "| pooled Pearson | n x coefficient: min .. max |",
        "|---|---|---|---|---|---|---|",
    ]
    for (experiment, protocol, reading), rhos in record.spearman.items():
        points = record.points[(experiment, protocol, reading)]
        scaled, volumes = zip(*points)
        pooled = spearmanr(scaled, volumes).statistic
        pearson = float(np.corrcoef(scaled, volumes)[0, 1])
        mean, std = _mean_std(rhos)
        lines.append(
            f"| {experiment} | {protocol} | {reading} | {mean:+.2f} ± {std:.2f} "
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
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )


def run(settings: Settings, protocols: Sequence[str], experiments: Sequence[str]) -> Record:
    """All seeds, protocols and experiments; returns the collected record."""
    torch.set_num_threads(1)
    record = Record()
    for seed in range(settings.seeds):
        tasks = load_tasks(seed, settings.pretrain_fraction)
        start = pretrain(tasks, settings, seed)
        for protocol in protocols:
            if "multi-task" in experiments:
                run_multi_task(tasks, start, protocol, settings, seed, record)
            if "same-task" in experiments:
                run_same_task(tasks, start, protocol, settings, seed, record)
    return record


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
            {"experiment": e, "protocol": p, "nan_norm": r, "values": v}
            for (e, p, r), v in record.spearman.items()
        ],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seeds", type=int, default=None, help="override the seed count")
    parser.add_argument("--protocol", choices=("steps", "epochs", "both"), default="both")
    parser.add_argument("--experiment", choices=("multi-task", "same-task", "both"), default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    settings = SIZES[args.size]
    if args.seeds is not None:
        settings = Settings(**{**settings.__dict__, "seeds": args.seeds})
    protocols = ("steps", "epochs") if args.protocol == "both" else (args.protocol,)
    experiments = ("multi-task", "same-task") if args.experiment == "both" else (args.experiment,)
    started = time.perf_counter()
    record = run(settings, protocols, experiments)
    print(report(record, settings, time.perf_counter() - started))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(record), indent=1))
    values = [v for vs in record.accuracies.values() for v in vs]
    return 0 if all(math.isfinite(v) for v in values) else 1


if __name__ == "__main__":
    sys.exit(main())
