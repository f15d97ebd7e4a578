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
(``nan_norm`` delta/weights x ``nan_exponent`` 1/2), NAN at layer and model
granularity (one coefficient per model for each Linear module, or for the
whole model; delta and weights, p = 1), ``ties`` and ``ties+nan``.

Modules: ``quality_data`` (data and training), ``quality_merges`` (the
merges), ``quality_report`` (tables); this file runs them.

Run: ``python benchmarks/quality/quality.py`` (about two minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from quality_data import (
    SIZES,
    Pretrained,
    Settings,
    State,
    Task,
    accuracy,
    finetune,
    load_tasks,
    pretrain,
)
from quality_merges import GRANULARITIES, NAN_READINGS, merge_recipes, summary_coefficients
from quality_report import Record, report, to_json


def _record_coefficients(
    record: Record,
    setting: Tuple[str, str],
    base: State,
    models: Sequence[State],
    volumes: Sequence[int],
) -> None:
    """Per-model NAN coefficients at every granularity and reading, against ``volumes``."""
    for granularity in GRANULARITIES:
        for reading in NAN_READINGS:
            coefficients = summary_coefficients(base, models, reading, granularity)
            record.add_coefficients((*setting, granularity, reading), coefficients, volumes)


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
        merged = method(start.body, bodies, volumes)
        for task, tune in zip(tasks, tunes):
            score = accuracy(merged, tune.head, task.test, settings.hidden)
            record.add_accuracy((experiment, protocol, method.label, task.name), score)
    _record_coefficients(record, (experiment, protocol), start.body, bodies, volumes)


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
            body, head = _split(method(base, wholes, volumes))
            score = accuracy(body, head, task.test, settings.hidden)
            record.add_accuracy((experiment, protocol, method.label, task.name), score)
        _record_coefficients(record, (experiment, protocol), base, wholes, volumes)


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
