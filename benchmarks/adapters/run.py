"""Adapter merging: one LoRA adapter from the factors against the full model through base+adapter.

Builds (under ``benchmarks/.cache/``) a seeded Llama-shaped base model (the overhead
benchmark's families) and three PEFT LoRA adapters of it (every linear module of every
layer, rank ``--rank``, different seeds and B scales), then merges them with ``nan`` both
ways, as child processes side by side in alternating rounds:

* ``adapter``: ``mergekit-nan merge RECIPE OUT`` on the adapter recipe (one LoRA adapter out);
* ``base+adapter``: the stock ``mergekit-yaml`` on the same recipe over ``base+adapter_i``
  models, which folds each adapter into a full copy of the base in its LoRA cache and then
  merges the copies into a full model.

Per run: wall and CPU seconds, peak RSS (``ru_maxrss``), the bytes the child wrote
(``wchar`` of ``/proc/self/io`` at exit: every ``write``, files and pipes) and the bytes
left on disk (output and LoRA cache). Medians over the rounds, and their ratios. Finally
base + merged adapter is compared with the full merge on a few modules (both in the
recipe's dtype, so the difference is that dtype's rounding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "overhead"))  # its model families
from overhead_models import FAMILIES, Shape, family_root, write_family  # noqa: E402

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B_SCALES = (0.002, 0.004, 0.008)
"""Standard deviation of each adapter's B factor (A has unit-variance rows over sqrt(in))."""

_WRAPPER = """
import atexit, sys
from importlib.metadata import entry_points
report = sys.argv[1]
def save():
    with open('/proc/self/io') as source, open(report, 'w') as target:
        target.write(source.read())
atexit.register(save)
(script,) = entry_points(group='console_scripts', name=sys.argv[2])
sys.argv = sys.argv[2:]
sys.exit(script.load()())
"""
"""Runs a console script and, at exit, saves its ``/proc/self/io`` (what it read and wrote)."""


def build_base(cache: Path, size: str) -> Path:
    """The base model of the ``size`` family (built once; the fine-tunes are not needed)."""
    shape = FAMILIES[size].shape
    base = family_root(cache, size) / "base"
    marker = base.parent / "base-complete.json"
    if not marker.exists() or json.loads(marker.read_text()) != repr(shape):
        write_family([base], shape, 0, ())
        marker.write_text(json.dumps(repr(shape)))
    return base


def _module_shapes(shape: Shape) -> Dict[str, tuple]:
    return {
        name[: -len(".weight")]: dims
        for name, dims in shape.tensors()
        if any(f".{target}." in name for target in TARGETS)
    }


def build_adapters(cache: Path, size: str, base: Path, rank: int) -> List[Path]:
    """Three float32 PEFT LoRA adapters of ``base`` (alpha = 2 r), written directly."""
    shape = FAMILIES[size].shape
    root = family_root(cache, size) / f"adapters-r{rank}"
    paths = [root / f"adapter{i}" for i in range(len(B_SCALES))]
    if (root / "complete").exists():
        return paths
    modules = _module_shapes(shape)
    for index, (path, scale) in enumerate(zip(paths, B_SCALES)):
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(1000 + index)
        tensors = {}
        for module, (rows, columns) in modules.items():
            key = f"base_model.model.{module}"
            a = torch.randn(rank, columns, generator=generator) / math.sqrt(columns)
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = scale * torch.randn(rows, rank, generator=generator)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        settings = {
            "peft_type": "LORA",
            "base_model_name_or_path": str(base),
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS),
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
        (path / "adapter_config.json").write_text(json.dumps(settings, indent=1))
    (root / "complete").write_text("")
    return paths


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_child(command: Sequence[str], work: Path, label: str) -> Dict[str, float]:
    """One merge as a child process: wall, CPU, peak RSS, bytes written and left on disk."""
    report = work / f"{label}.io"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(work / f"{label}.log", "w") as log:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(report), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{label} failed: {(work / f'{label}.log').read_text()[-3000:]}")
    io = dict(line.split(": ") for line in report.read_text().splitlines())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "written_bytes": int(io["wchar"]),
        "read_bytes": int(io["rchar"]),
    }


def recipes(base: Path, adapters: Sequence[Path], work: Path) -> Dict[str, Path]:
    adapter = {
        "merge_method": "nan",
        "base_model": str(base),
        "models": [{"model": str(path)} for path in adapters],
        "dtype": "bfloat16",
    }
    stock = dict(adapter, models=[{"model": f"{base}+{path}"} for path in adapters])
    found = {}
    for name, recipe in (("adapter", adapter), ("base+adapter", stock)):
        found[name] = work / f"{name}.yml"
        found[name].write_text(yaml.safe_dump(recipe))
    return found


def one_round(recipe: Dict[str, Path], work: Path, order: Sequence[str]) -> Dict[str, Dict]:
    results = {}
    for name in order:
        out, cache = work / f"out-{name}", work / f"lora-cache-{name}"
        for path in (out, cache):
            shutil.rmtree(path, ignore_errors=True)
        if name == "adapter":
            command = ["mergekit-nan", "merge", str(recipe[name]), str(out), "-q"]
        else:
            cache.mkdir()
            command = ["mergekit-yaml", str(recipe[name]), str(out), "--lora-merge-cache"]
            command += [str(cache), "--no-copy-tokenizer"]
        results[name] = run_child(command, work, name)
        results[name]["on_disk_bytes"] = _size(out) + _size(cache)
    return results


def compare(base: Path, work: Path, modules: Sequence[str]) -> float:
    """Largest relative difference of base + merged adapter from the full merge on ``modules``."""
    worst = 0.0
    adapter = safe_open(str(work / "out-adapter" / "adapter_model.safetensors"), "pt")
    for module in modules:
        name = module + ".weight"
        b = adapter.get_tensor(f"base_model.model.{module}.lora_B.weight").double()
        a = adapter.get_tensor(f"base_model.model.{module}.lora_A.weight").double()
        base_tensor = _tensor(base, name).double()
        full = _tensor(work / "out-base+adapter", name).double()
        got = (base_tensor + b @ a).to(torch.bfloat16).double()
        worst = max(worst, float((got - full).abs().max() / full.abs().max()))
    return worst


def _tensor(directory: Path, name: str) -> torch.Tensor:
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as file:
            if name in file.keys():
                return file.get_tensor(name)
    raise KeyError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="full")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model cache folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    base = build_base(args.cache, args.size)
    adapters = build_adapters(args.cache, args.size, base, args.rank)
    work = family_root(args.cache, args.size) / "work-adapters"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = recipes(base, adapters, work)
    runs: Dict[str, List[Dict]] = {"adapter": [], "base+adapter": []}
    for number in range(args.rounds):
        order = ["adapter", "base+adapter"] if number % 2 == 0 else ["base+adapter", "adapter"]
        for name, result in one_round(recipe, work, order).items():
            runs[name].append(result)
    modules = list(_module_shapes(FAMILIES[args.size].shape))[:7]
    difference = compare(base, work, modules)

    keys = ("wall_s", "cpu_s", "peak_rss_bytes", "written_bytes", "on_disk_bytes")
    medians = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    print(
        f"{args.size} base ({FAMILIES[args.size].description}), 3 rank-{args.rank} adapters "
        f"on {len(_module_shapes(FAMILIES[args.size].shape))} modules, nan, bfloat16, "
        f"{args.rounds} alternating rounds (medians); load {load_start:.2f} / "
        f"{os.getloadavg()[0]:.2f} at start / end"
    )
    print(
        f"{'':16}{'wall s':>10}{'CPU s':>10}{'peak RSS MB':>14}{'written MB':>13}{'on disk MB':>13}"
    )
    for name, values in medians.items():
        print(
            f"{name:16}{values['wall_s']:10.2f}{values['cpu_s']:10.2f}"
            f"{values['peak_rss_bytes'] / 1e6:14.1f}{values['written_bytes'] / 1e6:13.1f}"
            f"{values['on_disk_bytes'] / 1e6:13.1f}"
        )
    ratios = {k: medians["base+adapter"][k] / medians["adapter"][k] for k in keys}
    print(
        "base+adapter / adapter: "
        + ", ".join(
            f"{k.replace('_bytes', '').replace('_s', '')} {v:.1f}x" for k, v in ratios.items()
        )
    )
    print(
        f"base + merged adapter vs the full merge, {len(modules)} modules: {difference:.2e} max relative"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"runs": runs, "medians": medians, "ratios": ratios, "difference": difference},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
