"""Results of the language-model quality benchmark: the record of a run, Markdown and JSON.

Losses are held-out cross-entropies in nats per byte (lower is better), one
value per seed; a merge's loss is on the test split at the ``lambda`` it scored
best with on the validation split. Paired differences are a method's mean
loss over the experiment's domains minus its reference's, seed by seed
(negative: the method is better); "(w/l)" counts seeds better / worse.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from quality_lm_compare import accuracy_table, compare_table
from quality_lm_merges import UNIFORM, spearman

Key = Tuple[str, str, str]
"""(experiment, regime, row label)."""


@dataclass
class ExpertRecord:
    """One fine-tuned expert: its data, training, norm, NAN coefficients and losses."""

    experiment: str
    regime: str
    seed: int
    index: int
    domain: str
    volume: int
    steps: int
    epochs: float
    train_s: float
    own_val: float
    base_own_val: float
    own_loss: float
    """Test loss on its own domain; ``base_own_loss`` is the base's there."""
    base_own_loss: float
    norm: float = math.nan
    """Whole-model task-vector norm ||theta_i - base||."""
    alpha_model_p1: float = math.nan
    alpha_model_p2: float = math.nan
    alpha_tensor_p1: float = math.nan
    """NAN's per-tensor coefficient (p = 1) averaged over the tensors."""
    oracle_weight: float = math.nan

    @property
    def gain(self) -> float:
        """How much better than the base it is on its own domain's test split."""
        return self.base_own_loss - self.own_loss


@dataclass
class MergeCheck:
    """A linear merge against its float64 recomputation (see ``quality_lm_merges.deviation``)."""

    experiment: str
    regime: str
    seed: int
    method: str
    lam: float
    deviation: float


@dataclass
class Record:
    """Everything a run measured, keyed so that seeds can be paired."""

    losses: Dict[Tuple[str, str, str, str], Dict[int, float]] = field(default_factory=dict)
    """(experiment, regime, row, domain) -> {seed: test loss}."""
    lambdas: Dict[Key, Dict[int, float]] = field(default_factory=dict)
    references: Dict[str, Optional[str]] = field(default_factory=dict)
    """Merge row label -> its stock counterpart (``ties+nan`` -> ``ties (uniform)``) or None;
    every merge is also compared with uniform task arithmetic."""
    validation: List[Dict[str, object]] = field(default_factory=list)
    experts: List[ExpertRecord] = field(default_factory=list)
    checks: List[MergeCheck] = field(default_factory=list)
    corpora: Dict[str, Dict[str, object]] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    """Experts that did not beat the base on their own domain by the size's ``min_gain``."""
    compare: List[Dict[str, object]] = field(default_factory=list)
    """``mergekit-nan compare``'s findings per regime and seed (``--compare``)."""

    def add_loss(self, key: Key, domain: str, seed: int, value: float) -> None:
        self.losses.setdefault((*key, domain), {})[seed] = value

    def mean_loss(self, key: Key) -> Dict[int, float]:
        """Per seed, the loss averaged over the experiment's domains."""
        per_domain = [v for (e, r, m, _), v in self.losses.items() if (e, r, m) == key]
        seeds = sorted(set.intersection(*(set(v) for v in per_domain))) if per_domain else []
        return {s: statistics.fmean(v[s] for v in per_domain) for s in seeds}


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _grouped(pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Unique (experiment, regime) pairs, experiment by experiment, in order of appearance."""
    unique = list(dict.fromkeys(pairs))
    experiments = list(dict.fromkeys(e for e, _ in unique))
    return sorted(unique, key=lambda pair: (experiments.index(pair[0]), unique.index(pair)))


def _settings(record: Record) -> List[Tuple[str, str]]:
    return _grouped([(e, r) for e, r, _, _ in record.losses])


def _expert_settings(record: Record) -> List[Tuple[str, str]]:
    return _grouped([(x.experiment, x.regime) for x in record.experts])


def loss_table(record: Record, experiment: str, regime: str) -> List[str]:
    """Rows: base, experts alone, merges; columns: test loss per domain, mean, lambda."""
    keys = [k for k in record.losses if k[:2] == (experiment, regime)]
    rows = list(dict.fromkeys(k[2] for k in keys))
    domains = list(dict.fromkeys(k[3] for k in keys))
    lines = [
        "| model | " + " | ".join(domains) + " | mean | lambda |",
        "|---|" + "---|" * (len(domains) + 2),
    ]
    for row in rows:
        cells = [
            _mean_std(list(record.losses[(experiment, regime, row, d)].values())) for d in domains
        ]
        chosen = record.lambdas.get((experiment, regime, row))
        lam = _mean_std(list(chosen.values()), 2) if chosen else "-"
        mean = _mean_std(list(record.mean_loss((experiment, regime, row)).values()))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean} | {lam} |")
    return lines


def paired(record: Record, key: Key, reference: str) -> List[float]:
    """Seed by seed: mean loss of ``key`` minus that of ``reference`` (same experiment, regime)."""
    ours = record.mean_loss(key)
    theirs = record.mean_loss((key[0], key[1], reference))
    return [ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))]


def paired_table(record: Record) -> List[str]:
    """Rows: every merge against uniform task arithmetic, then each ``+nan`` against its stock
    method; columns: experiment and regime."""
    settings = _settings(record)
    lines = [
        "| merge vs reference | " + " | ".join(f"{e}, {r}" for e, r in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    pairs = [(method, UNIFORM) for method in record.references if method != UNIFORM]
    pairs += [(m, r) for m, r in record.references.items() if r is not None and r != UNIFORM]
    for method, reference in pairs:
        cells = []
        for experiment, regime in settings:
            diff = paired(record, (experiment, regime, method), reference)
            if not diff:
                cells.append("-")
                continue
            better, worse = sum(d < 0 for d in diff), sum(d > 0 for d in diff)
            std = statistics.stdev(diff) if len(diff) > 1 else 0.0
            cells.append(f"{statistics.fmean(diff):+.4f} ± {std:.4f} ({better}/{worse})")
        lines.append(f"| {method} vs {reference} | " + " | ".join(cells) + " |")
    return lines


def _experts(record: Record, experiment: str, regime: str) -> List[ExpertRecord]:
    return [x for x in record.experts if (x.experiment, x.regime) == (experiment, regime)]


def _rhos(experts: Sequence[ExpertRecord], field_name: str) -> Tuple[List[float], float]:
    """Spearman of norm with ``field_name``, per seed and pooled over seeds."""
    per_seed = []
    for seed in sorted({x.seed for x in experts}):
        mine = [x for x in experts if x.seed == seed]
        per_seed.append(spearman([x.norm for x in mine], [getattr(x, field_name) for x in mine]))
    pooled = spearman([x.norm for x in experts], [getattr(x, field_name) for x in experts])
    return per_seed, pooled


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "n/a"


def norm_table(record: Record) -> List[str]:
    """Spearman of whole-model task-vector norm with data volume and with optimiser steps."""
    lines = [
        "| experiment | regime | rho(norm, volume) per seed | pooled | rho(norm, steps) per seed "
        "| pooled | norm of smallest / largest volume |",
        "|---|---|---|---|---|---|---|",
    ]
    for experiment, regime in _expert_settings(record):
        experts = _experts(record, experiment, regime)
        volume, volume_pooled = _rhos(experts, "volume")
        steps, steps_pooled = _rhos(experts, "steps")
        ratios = []
        for seed in sorted({x.seed for x in experts}):
            mine = sorted((x for x in experts if x.seed == seed), key=lambda x: x.volume)
            ratios.append(mine[0].norm / mine[-1].norm)
        steps_cell = _mean_std(steps, 2) if any(map(math.isfinite, steps)) else "n/a (equal)"
        lines.append(
            f"| {experiment} | {regime} | {_mean_std(volume, 2)} | {_signed(volume_pooled)} | "
            f"{steps_cell} | {_signed(steps_pooled)} | {_mean_std(ratios, 2)} |"
        )
    return lines


def coefficient_table(record: Record) -> List[str]:
    """Per volume: steps, norm, NAN coefficients, the oracle weight and the gain over the base."""
    lines = [
        "| experiment | regime | volume | steps | epochs | norm | alpha model p=1 "
        "| alpha model p=2 | alpha tensor-mean p=1 | oracle weight "
        "| own-domain gain over base (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fields = ("epochs", "norm", "alpha_model_p1", "alpha_model_p2", "alpha_tensor_p1")
    for experiment, regime in _expert_settings(record):
        experts = _experts(record, experiment, regime)
        for volume in sorted({x.volume for x in experts}):
            mine = [x for x in experts if x.volume == volume]
            cells = [_mean_std([float(x.steps) for x in mine], 0)]
            cells += [_mean_std([getattr(x, f) for x in mine]) for f in fields]
            cells.append(_mean_std([x.oracle_weight for x in mine]))
            gains = [x.gain for x in mine]
            cells.append(f"{_mean_std(gains)} ({min(gains):.3f})")
            lines.append(f"| {experiment} | {regime} | {volume} B | " + " | ".join(cells) + " |")
    return lines


def check_line(record: Record) -> str:
    """How closely mergekit's linear merges match the float64 recomputation."""
    if not record.checks:
        return "No linear merge was checked."
    worst = max(record.checks, key=lambda c: c.deviation)
    return (
        f"Check: {len(record.checks)} linear merges (task arithmetic, oracle, nan at every "
        "granularity) recomputed in float64 from the checkpoints; largest deviation "
        f"{worst.deviation:.1e} of the largest task-vector entry ({worst.method}, "
        f"lambda {worst.lam:g}, {worst.experiment}, {worst.regime}, seed {worst.seed})."
    )


def gain_line(record: Record, minimum: Optional[float]) -> str:
    """Whether every expert beat the base on its own domain (validation split)."""
    if record.failures:
        return "EXPERT CHECK FAILED: " + "; ".join(record.failures) + "."
    if not record.experts:
        return "No expert was trained."
    worst = min(record.experts, key=lambda x: x.base_own_val - x.own_val)
    gain = worst.base_own_val - worst.own_val
    required = f"at least {minimum} required" if minimum is not None else "not enforced"
    verdict = "every expert beats" if gain > 0 else "NOT every expert beats"
    return (
        f"Expert check: {verdict} the base on its own domain's validation split; smallest "
        f"gain {gain:.3f} nats/byte ({required}; {worst.domain}, {worst.volume} B, "
        f"{worst.experiment}, {worst.regime}, seed {worst.seed})."
    )


def machine() -> Dict[str, str]:
    """CPU model, core count, library versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **{name: version(name) for name in ("mergekit", "transformers", "mergekit-nan")},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@dataclass
class Header:
    """What the run was: machine, sizes, wall time."""

    machine: Dict[str, str]
    threads: int
    size: str
    settings: Dict[str, object]
    parameters: int
    seeds: int
    first_seed: int
    wall_s: float
    merges: int
    lambda_grid: List[float]
    pool_val_loss: float
    runs: int = 1
    """How many runs' JSON files this report combines (``--combine``); wall time is their sum."""


def report(record: Record, header: Header) -> str:
    """The Markdown report, ready to paste into ``benchmarks/RESULTS.md``."""
    m = header.machine
    first = f" (from seed {header.first_seed})" if header.first_seed else ""
    lines = [
        f"date: {m['date']}; machine: {m['cpu']}, {m['cores']} cores, {header.threads} torch "
        f"thread(s); torch {m['torch']}, transformers {m['transformers']}, mergekit "
        f"{m['mergekit']}, mergekit-nan {m['mergekit-nan']}, python {m['python']}",
        f"size: {header.size} ({header.parameters} parameters; base loss on held-out pool "
        f"{header.pool_val_loss:.3f}); seeds: {header.seeds}{first}; wall time: "
        f"{header.wall_s:.0f} s{f' (sum of {header.runs} runs)' if header.runs > 1 else ''}; "
        f"{header.merges} merges; lambda grid: {', '.join(f'{v:g}' for v in header.lambda_grid)}",
        "",
        *(
            [
                f"experts: LoRA adapters of rank {header.settings['lora_rank']} on every linear "
                "module, merged as adapters by mergekit-nan merge (one LoRA adapter per merge)",
                "",
            ]
            if header.settings.get("lora_rank")
            else []
        ),
        "Losses: nats per byte on the test split, mean ± std over seeds; merges at the lambda "
        "with the lowest validation loss (mean ± std of that lambda in the last column).",
        "",
    ]
    for experiment, regime in _settings(record):
        lines += [f"### {experiment}, regime {regime}", ""]
        lines += loss_table(record, experiment, regime) + [""]
    lines += [
        "### Paired by seed: mean-loss difference to the reference "
        "(nats/byte; negative = better; seeds better/worse)",
        "",
    ]
    lines += paired_table(record) + [""]
    lines += ["### Task-vector norm against data volume and optimiser steps (Spearman)", ""]
    lines += norm_table(record) + [""]
    lines += ["### NAN coefficients per expert against data volume", ""]
    lines += coefficient_table(record) + [""]
    minimum = header.settings.get("min_gain")
    minimum = float(minimum) if isinstance(minimum, (int, float)) else None
    lines += [gain_line(record, minimum), "", check_line(record)]
    if record.compare:
        lines += ["", "### mergekit-nan compare on the experts and the test split", ""]
        lines += compare_table(record)
        accuracy = accuracy_table(record)
        lines += [""] + accuracy if accuracy else []
    return "\n".join(lines)


def to_json(record: Record, header: Header) -> Dict[str, object]:
    """Every per-seed number of the run."""
    return {
        **dataclasses.asdict(header),
        "corpora": record.corpora,
        "losses": [
            {
                "experiment": e,
                "regime": r,
                "model": m,
                "domain": d,
                "seeds": {str(s): v for s, v in values.items()},
            }
            for (e, r, m, d), values in record.losses.items()
        ],
        "chosen_lambdas": [
            {
                "experiment": e,
                "regime": r,
                "model": m,
                "seeds": {str(s): v for s, v in values.items()},
            }
            for (e, r, m), values in record.lambdas.items()
        ],
        "references": record.references,
        "validation": record.validation,
        "experts": [dataclasses.asdict(x) for x in record.experts],
        "checks": [dataclasses.asdict(c) for c in record.checks],
        "failures": record.failures,
        "compare": record.compare,
    }


def from_json(payloads: Sequence[Dict[str, object]]) -> Tuple[Record, Header]:
    """One record and header from the JSON of several runs (other seeds or regimes).

    Settings are ordered experiment by experiment, then regime by regime, each in
    order of first appearance; seeds, merges and wall times add up.
    """
    record = Record()
    for payload in payloads:
        for row in payload["losses"]:
            key = (row["experiment"], row["regime"], row["model"])
            for seed, value in row["seeds"].items():
                record.add_loss(key, row["domain"], int(seed), value)
        for row in payload["chosen_lambdas"]:
            key = (row["experiment"], row["regime"], row["model"])
            for seed, value in row["seeds"].items():
                record.lambdas.setdefault(key, {})[int(seed)] = value
        record.references.update(payload["references"])
        record.corpora.update(payload["corpora"])
        record.validation += payload["validation"]
        record.experts += [ExpertRecord(**x) for x in payload["experts"]]
        record.checks += [MergeCheck(**c) for c in payload["checks"]]
        record.failures += payload["failures"]
        record.compare += payload.get("compare", [])
    experiments = list(dict.fromkeys(e for e, _, _, _ in record.losses))
    regimes = list(dict.fromkeys(r for _, r, _, _ in record.losses))
    record.losses = dict(
        sorted(
            record.losses.items(),
            key=lambda item: (experiments.index(item[0][0]), regimes.index(item[0][1])),
        )
    )
    seeds = {int(s) for row in record.losses.values() for s in row}
    fields = {f.name for f in dataclasses.fields(Header)}
    first = {k: v for k, v in payloads[0].items() if k in fields}
    header = Header(
        **{
            **first,
            "seeds": len(seeds),
            "first_seed": min(seeds),
            "wall_s": sum(float(p["wall_s"]) for p in payloads),
            "merges": sum(int(p["merges"]) for p in payloads),
            "runs": sum(int(p.get("runs", 1)) for p in payloads),
        }
    )
    return record, header
