"""Markdown tables of the overhead benchmark, and the machine they were measured on."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

GIB = 2**30
MIB = 2**20


@dataclass
class Measurement:
    """One merge: which pair it belongs to, wall seconds and peak resident set size in bytes."""

    pair: str
    method: str
    round: int
    wall_s: float
    max_rss: int
    peak_anon: int = 0
    """Sampled peak of anonymous resident memory (0: not sampled)."""
    peak_file: int = 0
    """Sampled peak of file-backed resident memory, e.g. memory-mapped inputs."""
    cpu_s: float = 0.0
    """User plus system CPU seconds of the merge's process (0: not measured)."""


def machine() -> Dict[str, str]:
    """Date, CPU model, cores, RAM, GPU, load average and library versions."""
    import mergekit

    cpu, memory = platform.processor() or platform.machine(), "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / MIB:.0f} GiB"  # kB
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": memory,
        "gpu": gpu,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "mergekit": getattr(mergekit, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def merge_table(results: Sequence[Measurement], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """Markdown: per pair, median wall and peak RSS of each side and the ratios.

    ``wall A/B`` is the ratio of the medians; ``paired`` the median over rounds of
    each round's A/B (a round runs A and B back to back, so drifts of the machine
    cancel); ``CPU A/B`` the ratio of the median CPU seconds (user + system), which
    time taken by other tenants of the machine does not inflate.
    """
    lines = [
        "| pair (A vs B) | wall A (s) | wall B (s) | wall A/B | paired A/B | CPU A/B "
        "| peak RSS A (GiB) | peak RSS B (GiB) | RSS A/B | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        label = f"{a} vs {b}"
        mine = [r for r in results if r.pair == label]
        side = {m: [r for r in mine if r.method == m] for m in (a, b)}
        if not side[a] or not side[b]:
            continue
        wa, wb = (_median([r.wall_s for r in side[m]]) for m in (a, b))
        ra, rb = (_median([r.max_rss for r in side[m]]) for m in (a, b))
        rounds = {r.round: r for r in side[b]}
        paired = [r.wall_s / rounds[r.round].wall_s for r in side[a] if r.round in rounds]
        cpu = [_median([r.cpu_s for r in side[m]]) for m in (a, b)]
        cpu_ratio = f"{cpu[0] / cpu[1]:.3f}" if all(cpu) else "-"
        lines.append(
            f"| {label} | {wa:.2f} | {wb:.2f} | {wa / wb:.3f} | {_median(paired):.3f} "
            f"| {cpu_ratio} | {ra / GIB:.3f} | {rb / GIB:.3f} | {ra / rb:.3f} | {len(side[a])} |"
        )
    return lines


def per_round(results: Sequence[Measurement]) -> List[str]:
    """One line per measured method: its wall times in round order."""
    lines = []
    for pair in dict.fromkeys(r.pair for r in results):
        for method in dict.fromkeys(r.method for r in results if r.pair == pair):
            mine = [r for r in results if r.pair == pair and r.method == method]
            walls = " / ".join(f"{r.wall_s:.2f}" for r in mine)
            split = " / ".join(f"{r.peak_anon / GIB:.2f} + {r.peak_file / GIB:.2f}" for r in mine)
            lines.append(
                f"- {pair}: {method} wall (s) per round {walls}; "
                f"sampled peak RSS anonymous + file-backed (GiB) {split}"
            )
    return lines


def probe_table(probes: Mapping[str, Sequence[int]], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """Markdown: kernel peak growth on the largest tensor, medians, A - B."""
    lines = [
        "| pair (A vs B), largest tensor | peak growth A (MiB) | peak growth B (MiB) | A - B (MiB) |",
        "|---|---|---|---|",
    ]
    for a, b in pairs:
        if a in probes and b in probes:
            pa, pb = _median(probes[a]) / MIB, _median(probes[b]) / MIB
            lines.append(f"| {a} vs {b} | {pa:.1f} | {pb:.1f} | {pa - pb:+.1f} |")
    return lines


def norm_table(norms: Mapping[str, float], device: str) -> List[str]:
    """Markdown: the coefficient pass against the plain-read floor."""
    clock = "CPU seconds" if device == "cpu" else "seconds"
    return [
        f"| pass ({device}, {norms['gigabytes_per_pass']:.2f} GB of bf16 per pass) "
        f"| {clock} | GB/s | vs plain read |",
        "|---|---|---|---|",
        f"| plain read (one fp32 sum per tensor) | {norms['plain_s']:.3f} "
        f"| {norms['plain_gb_s']:.2f} | 1.00 |",
        f"| NAN coefficient pass (frobenius_norms, task vectors) | {norms['nan_s']:.3f} "
        f"| {norms['nan_gb_s']:.2f} | {norms['nan_gb_s'] / norms['plain_gb_s']:.2f} |",
    ]


def _sampled(values: Sequence[int]) -> str:
    sampled = [v for v in values if v > 0]  # 0: a run from before the split was sampled
    return f"{_median(sampled) / MIB:.0f}" if sampled else "-"


def size_table(payloads: Sequence[Mapping[str, object]]) -> List[str]:
    """Markdown: peak RSS of ``nan`` and ``linear`` against model size, one row per run.

    Next to it: the bf16 bytes of the largest tensor times the number of inputs
    (what a tensor-by-tensor merge must hold at once) and of all inputs together.
    """
    lines = [
        "| model | out shard size | parameters | inputs | largest tensor (M elements) "
        "| largest x inputs, bf16 (MiB) | all inputs, bf16 (MiB) "
        "| peak RSS nan (MiB) | peak RSS linear (MiB) | of which anonymous, nan / linear (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for payload in payloads:
        model = payload["model"]
        merges = payload["merges"]
        mine = {
            m: [r for r in merges if r["pair"] == "nan vs linear" and r["method"] == m]
            for m in ("nan", "linear")
        }
        rss = {m: [r["max_rss"] for r in rows] for m, rows in mine.items()}
        anon = {m: [r.get("peak_anon", 0) for r in rows] for m, rows in mine.items()}
        if not rss["nan"] or not rss["linear"]:
            continue
        inputs, largest = model["inputs"], model["largest_numel"]
        lines.append(
            f"| {model['size']} | {payload.get('out_shard_size', '5B (default)')} "
            f"| {model['parameters'] / 1e6:.2f}M | {inputs} "
            f"| {largest / 1e6:.2f} | {largest * inputs * 2 / MIB:.0f} "
            f"| {model['parameters'] * inputs * 2 / MIB:.0f} "
            f"| {_median(rss['nan']) / MIB:.0f} | {_median(rss['linear']) / MIB:.0f} "
            f"| {_sampled(anon['nan'])} / {_sampled(anon['linear'])} |"
        )
    return lines


def report(
    info: Mapping[str, str],
    description: str,
    parameters: int,
    inputs: int,
    pairs: Sequence[Tuple[str, str]],
    results: Sequence[Measurement],
    norms: Optional[Mapping[str, float]],
    device: str,
    probes: Optional[Mapping[str, Sequence[int]]] = None,
    notes: Sequence[str] = (),
) -> str:
    """The markdown report printed at the end of a run."""
    lines = [
        f"date: {info['date']}; CPU: {info['cpu']}, {info['cores']} cores; RAM {info['ram']}; "
        f"GPU: {info['gpu']}; torch {info['torch']}; python {info['python']}; "
        f"load average at the end: {info['load']}",
        f"model: {description}; {parameters / 1e6:.2f}M parameters, bf16; "
        f"base + {inputs - 1} fine-tunes",
        *notes,
        "",
    ]
    if results:
        lines += merge_table(results, pairs) + [""] + per_round(results) + [""]
    if probes:
        lines += probe_table(probes, pairs) + [""]
    if norms:
        lines += norm_table(norms, device)
    return "\n".join(lines)
