"""Overhead benchmark: what NAN coefficients cost on top of the stock mergekit methods.

Builds once (cached under ``benchmarks/.cache/``) a seeded Llama-shaped base
model and three fine-tunes (base plus Gaussian task vectors), bfloat16
safetensors, about 374M parameters at ``--size full``. Then, in one run,
alternates A/B pairs through the stock ``mergekit-yaml`` command, one child
process per merge, so wall time and peak RSS (``ru_maxrss`` from ``wait4``)
are per merge:

* ``nan`` vs ``linear`` (same four checkpoints, equal weights)
* ``ties+nan`` vs ``ties`` (same densities)
* ``dare_ties+nan`` vs ``dare_ties`` (same densities, same ``--random-seed``)

The order inside a pair alternates every round; medians are reported.

It also times the coefficient pass alone (``frobenius_norms`` over every
tensor of the four checkpoints, task-vector mode) against a plain read of the
same in-memory tensors (one float32 reduction over each), in GB/s of bf16
input.

Run: ``python benchmarks/overhead.py`` (``--size tiny`` for a quick check;
``--cuda`` passes ``--cuda`` to mergekit-yaml and times the coefficient pass
on the GPU, and needs a CUDA device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_nan.coefficients import frobenius_norms

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
DELTA_SCALES = (0.1, 0.2, 0.4)
"""Task-vector std of each fine-tune, relative to the base weights' std (0.02)."""
INIT_STD = 0.02
DENSITY = 0.5
RANDOM_SEED = 0


@dataclass(frozen=True)
class Shape:
    """Sizes of the Llama-shaped model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    shard_parameters: int

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """Names and shapes of the checkpoint, in the Llama layout of transformers."""
        h, i = self.hidden_size, self.intermediate_size
        out: List[Tuple[str, Tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, h))
        ]
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            out += [(f"{prefix}.self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"]
            out += [
                (f"{prefix}.mlp.gate_proj.weight", (i, h)),
                (f"{prefix}.mlp.up_proj.weight", (i, h)),
                (f"{prefix}.mlp.down_proj.weight", (h, i)),
                (f"{prefix}.input_layernorm.weight", (h,)),
                (f"{prefix}.post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    def parameters(self) -> int:
        """Total parameter count."""
        return sum(_numel(shape) for _, shape in self.tensors())

    def config(self) -> Dict[str, object]:
        """The ``config.json`` contents of a matching ``LlamaForCausalLM``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


SHAPES: Dict[str, Shape] = {
    "full": Shape(32000, 1024, 2816, 24, 16, shard_parameters=100_000_000),
    "tiny": Shape(256, 64, 128, 2, 4, shard_parameters=50_000),
}


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _generator(seed: int, model: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + model * 10_007 + index)


def _tensor(shape: Tuple[int, ...], seed: int, index: int, scale: Optional[float]) -> torch.Tensor:
    """Tensor ``index`` of the base (``scale`` None) or of a fine-tune with that delta scale."""
    if len(shape) == 1:
        base = torch.ones(shape)
    else:
        base = torch.randn(shape, generator=_generator(seed, 0, index)) * INIT_STD
    if scale is None:
        return base
    noise = torch.randn(shape, generator=_generator(seed, 1 + int(scale * 1000), index))
    return base + noise * (scale * INIT_STD)


def _shards(shape: Shape) -> Iterator[List[Tuple[int, str, Tuple[int, ...]]]]:
    shard: List[Tuple[int, str, Tuple[int, ...]]] = []
    count = 0
    for index, (name, dims) in enumerate(shape.tensors()):
        if shard and count + _numel(dims) > shape.shard_parameters:
            yield shard
            shard, count = [], 0
        shard.append((index, name, dims))
        count += _numel(dims)
    if shard:
        yield shard


def write_checkpoint(path: Path, shape: Shape, seed: int, scale: Optional[float]) -> None:
    """Stream one bf16 checkpoint to ``path``, shard by shard (never the whole model)."""
    path.mkdir(parents=True, exist_ok=True)
    shards = list(_shards(shape))
    weight_map: Dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: _tensor(dims, seed, index, scale).to(torch.bfloat16)
            for index, name, dims in shard
        }
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: filename for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(shape.config(), indent=1))


def build_family(cache: Path, size: str, seed: int = 0) -> List[Path]:
    """``[base, ft0, ft1, ft2]`` under ``cache``; built once, reused when complete."""
    shape = SHAPES[size]
    root = cache / f"llama-{size}-seed{seed}"
    marker = root / "complete.json"
    spec = {"shape": asdict(shape), "scales": DELTA_SCALES, "seed": seed, "init": INIT_STD}
    names = ["base"] + [f"ft{i}" for i in range(len(DELTA_SCALES))]
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return [root / name for name in names]
    if root.exists():
        shutil.rmtree(root)
    for name, scale in zip(names, (None, *DELTA_SCALES)):
        started = time.perf_counter()
        write_checkpoint(root / name, shape, seed, scale)
        print(f"built {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    marker.write_text(json.dumps(spec))
    return [root / name for name in names]


def merge_configs(paths: Sequence[Path]) -> Dict[str, Dict[str, object]]:
    """The six mergekit-yaml recipes, keyed by method name."""
    base, *tunes = (str(p) for p in paths)

    def models(parameters: Dict[str, object]) -> List[Dict[str, object]]:
        return [
            {"model": t, "parameters": dict(parameters)} if parameters else {"model": t}
            for t in tunes
        ]

    sparse = {"density": DENSITY}
    common = {"base_model": base, "dtype": "bfloat16"}
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, *tunes)],
            "dtype": "bfloat16",
        },
        "nan": {"merge_method": "nan", "models": models({}), **common},
        "ties": {"merge_method": "ties", "models": models({"weight": 1.0, **sparse}), **common},
        "ties+nan": {"merge_method": "ties+nan", "models": models(sparse), **common},
        "dare_ties": {
            "merge_method": "dare_ties",
            "models": models({"weight": 1.0, **sparse}),
            **common,
        },
        "dare_ties+nan": {"merge_method": "dare_ties+nan", "models": models(sparse), **common},
    }


PAIRS: Tuple[Tuple[str, str], ...] = (
    ("nan", "linear"),
    ("ties+nan", "ties"),
    ("dare_ties+nan", "dare_ties"),
)


def mergekit_yaml() -> str:
    """The stock console script next to this interpreter."""
    local = Path(sys.executable).parent / "mergekit-yaml"
    found = str(local) if local.exists() else shutil.which("mergekit-yaml")
    if found is None:
        raise SystemExit("mergekit-yaml is not installed")
    return found


@dataclass
class Measurement:
    """One merge: wall seconds and peak resident set size in bytes."""

    method: str
    round: int
    wall_s: float
    max_rss: int


def run_merge(config: Path, out: Path, extra: Sequence[str]) -> Tuple[float, int]:
    """Run the stock mergekit-yaml as a child; return (wall seconds, peak RSS bytes)."""
    if out.exists():
        shutil.rmtree(out)
    command = [mergekit_yaml(), str(config), str(out), "--no-copy-tokenizer", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as stream:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(
            f"mergekit-yaml failed ({child.returncode}); see the log:\n" + log.read_text()[-3000:]
        )
    shutil.rmtree(out)
    return wall, usage.ru_maxrss * 1024


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every checkpoint file once so no merge pays for the first disk read."""
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as stream:
                while stream.read(1 << 24):
                    pass


def measure_merges(
    paths: Sequence[Path], work: Path, rounds: int, extra: Sequence[str]
) -> List[Measurement]:
    """All pairs, ``rounds`` times, order inside each pair alternating per round."""
    work.mkdir(parents=True, exist_ok=True)
    configs = merge_configs(paths)
    files = {}
    for name, config in configs.items():
        files[name] = work / f"{name.replace('+', '_')}.yml"
        files[name].write_text(yaml.safe_dump(config))
    results = []
    for number in range(rounds):
        for pair in PAIRS:
            for method in pair if number % 2 == 0 else pair[::-1]:
                out = work / f"out-{method.replace('+', '_')}"
                wall, rss = run_merge(files[method], out, extra)
                results.append(Measurement(method, number, wall, rss))
                print(
                    f"round {number} {method:>14}: {wall:7.2f} s, {rss / 2**30:6.3f} GiB",
                    file=sys.stderr,
                )
    return results


def _load_group(handles: Sequence, name: str, device: str) -> List[torch.Tensor]:
    return [handle.get_tensor(name).to(device) for handle in handles]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_read(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The floor: one float32 reduction over each tensor (every byte read once)."""
    return [t.sum(dtype=torch.float32) for t in tensors]


def coefficient_pass(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """What NAN adds per tensor: task-vector norms of the fine-tunes against the base."""
    return frobenius_norms(list(tensors[1:]), tensors[0])


def measure_norm_pass(paths: Sequence[Path], repeats: int, device: str) -> Dict[str, float]:
    """Seconds and GB/s of the coefficient pass and of a plain read, same tensors in memory."""
    shape_names = _tensor_files(paths[0])
    opened = {}
    timings = {"plain": 0.0, "nan": 0.0}
    total_bytes = 0
    for name, file in shape_names:
        handles = []
        for path in paths:
            key = (path, file)
            if key not in opened:
                opened[key] = safe_open(str(path / file), framework="pt")
            handles.append(opened[key])
        tensors = _load_group(handles, name, device)
        total_bytes += sum(t.numel() * t.element_size() for t in tensors)
        for repeat in range(repeats):
            order = ("plain", "nan") if repeat % 2 == 0 else ("nan", "plain")
            for which in order:
                function = plain_read if which == "plain" else coefficient_pass
                _sync(device)
                started = time.perf_counter()
                function(tensors)
                _sync(device)
                timings[which] += time.perf_counter() - started
        del tensors
    gigabytes = total_bytes * repeats / 1e9
    return {
        "gigabytes_per_pass": total_bytes / 1e9,
        "plain_s": timings["plain"] / repeats,
        "nan_s": timings["nan"] / repeats,
        "plain_gb_s": gigabytes / timings["plain"],
        "nan_gb_s": gigabytes / timings["nan"],
    }


def _largest_tensor(path: Path) -> Tuple[str, str]:
    """(name, shard file) of the biggest tensor: where a merge reaches its peak memory."""
    best: Tuple[int, str, str] = (-1, "", "")
    for name, file in _tensor_files(path):
        with safe_open(str(path / file), framework="pt") as handle:
            numel = _numel(handle.get_slice(name).get_shape())
        best = max(best, (numel, name, file))
    return best[1], best[2]


def probe_peak(paths: Sequence[Path], method: str) -> int:
    """Bytes the peak RSS grows while ``method`` merges the largest tensor (this process).

    Runs the merge kernel through mergekit's in-process API on tensors already
    loaded, so only the kernel's own working set (and NAN's pass) counts.
    """
    import resource

    import mergekit.merge_methods  # noqa: F401  (the plugin registers on import)
    from mergekit.merge_methods.api import merge_tensors

    import mergekit_nan  # noqa: F401

    name, file = _largest_tensor(paths[0])
    tensors = []
    for path in paths:
        with safe_open(str(path / file), framework="pt") as handle:
            tensors.append(handle.get_tensor(name).clone())
    parameters = {
        "linear": {"weight": 1.0},
        "nan": {},
        "ties": {"weight": 1.0, "density": DENSITY},
        "dare_ties": {"weight": 1.0, "density": DENSITY},
    }[method.removesuffix("+nan")]
    if method.endswith("+nan"):
        parameters = {k: v for k, v in parameters.items() if k != "weight"}
    base_index = None if method == "linear" else 0
    torch.manual_seed(RANDOM_SEED)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merge_tensors(tensors, method, parameters=parameters, base_index=base_index, name=name)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024


def measure_probes(repeats: int, cache: Path, size: str) -> Dict[str, List[int]]:
    """Peak growth of each method on the largest tensor, one fresh child per probe."""
    results: Dict[str, List[int]] = {}
    for number in range(repeats):
        for pair in PAIRS:
            for method in pair if number % 2 == 0 else pair[::-1]:
                command = [sys.executable, __file__, "--cache", str(cache), "--size", size]
                command += ["--probe", method]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                results.setdefault(method, []).append(int(output.stdout.strip()))
    return results


def probe_table(probes: Dict[str, List[int]]) -> List[str]:
    """Markdown: kernel peak growth on the largest tensor, medians, A/B ratio."""
    lines = [
        "| pair (A vs B), largest tensor | peak growth A (MiB) | peak growth B (MiB) | A - B (MiB) |",
        "|---|---|---|---|",
    ]
    for a, b in PAIRS:
        if a in probes and b in probes:
            pa, pb = _median(probes[a]) / 2**20, _median(probes[b]) / 2**20
            lines.append(f"| {a} vs {b} | {pa:.1f} | {pb:.1f} | {pa - pb:+.1f} |")
    return lines


def _tensor_files(path: Path) -> List[Tuple[str, str]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return list(index["weight_map"].items())


def machine() -> Dict[str, str]:
    """CPU model, cores, RAM, GPU and library versions."""
    import mergekit

    cpu, memory = platform.processor() or platform.machine(), "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
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
        "torch": torch.__version__,
        "mergekit": getattr(mergekit, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def merge_table(results: Sequence[Measurement]) -> List[str]:
    """Markdown: per pair, median wall and peak RSS of each side and the ratios."""
    lines = [
        "| pair (A vs B) | wall A (s) | wall B (s) | wall A/B | peak RSS A (GiB) "
        "| peak RSS B (GiB) | RSS A/B | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b in PAIRS:
        walls = {m: [r.wall_s for r in results if r.method == m] for m in (a, b)}
        rss = {m: [r.max_rss for r in results if r.method == m] for m in (a, b)}
        if not walls[a] or not walls[b]:
            continue
        wa, wb = _median(walls[a]), _median(walls[b])
        ra, rb = _median(rss[a]), _median(rss[b])
        lines.append(
            f"| {a} vs {b} | {wa:.2f} | {wb:.2f} | {wa / wb:.3f} | {ra / 2**30:.3f} "
            f"| {rb / 2**30:.3f} | {ra / rb:.3f} | {len(walls[a])} |"
        )
    return lines


def norm_table(norms: Dict[str, float], device: str) -> List[str]:
    """Markdown: the coefficient pass against the plain-read floor."""
    return [
        f"| pass ({device}, {norms['gigabytes_per_pass']:.2f} GB of bf16 per pass) "
        "| seconds | GB/s | vs plain read |",
        "|---|---|---|---|",
        f"| plain read (one fp32 sum per tensor) | {norms['plain_s']:.3f} "
        f"| {norms['plain_gb_s']:.2f} | 1.00 |",
        f"| NAN coefficient pass (frobenius_norms, task vectors) | {norms['nan_s']:.3f} "
        f"| {norms['nan_gb_s']:.2f} | {norms['nan_gb_s'] / norms['plain_gb_s']:.2f} |",
    ]


def report(
    info: Dict[str, str],
    shape: Shape,
    results: Sequence[Measurement],
    norms: Optional[Dict[str, float]],
    device: str,
    probes: Optional[Dict[str, List[int]]] = None,
) -> str:
    """The markdown report printed at the end."""
    lines = [
        f"date: {info['date']}; CPU: {info['cpu']}, {info['cores']} cores; RAM {info['ram']}; "
        f"GPU: {info['gpu']}; torch {info['torch']}; python {info['python']}",
        f"model: Llama-shaped, {shape.parameters() / 1e6:.2f}M parameters, bf16, "
        f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}; base + 3 fine-tunes; "
        f"density {DENSITY}, --random-seed {RANDOM_SEED}",
        "",
    ]
    if results:
        lines += merge_table(results) + [""]
    if probes:
        lines += probe_table(probes) + [""]
    if norms:
        lines += norm_table(norms, device)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="full")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per pair")
    parser.add_argument("--norm-repeats", type=int, default=3, help="repeats of the norm pass")
    parser.add_argument("--cuda", action="store_true", help="merge and time norms on the GPU")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model cache folder")
    parser.add_argument("--skip-merges", action="store_true", help="only the norm pass")
    parser.add_argument("--probe-repeats", type=int, default=3, help="largest-tensor probes")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(probe_peak(build_family(args.cache, args.size), args.probe))
        return 0
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA device; none is visible to torch")
    device = "cuda" if args.cuda else "cpu"
    paths = build_family(args.cache, args.size)
    warm_page_cache(paths)
    extra = ["--random-seed", str(RANDOM_SEED)] + (["--cuda"] if args.cuda else [])
    results = (
        []
        if args.skip_merges
        else measure_merges(paths, args.cache / f"work-{args.size}", args.rounds, extra)
    )
    probes = measure_probes(args.probe_repeats, args.cache, args.size) if args.probe_repeats else {}
    norms = measure_norm_pass(paths, args.norm_repeats, device)
    info = machine()
    print(report(info, SHAPES[args.size], results, norms, device, probes))
    if args.json is not None:
        payload = {
            "machine": info,
            "merges": [asdict(r) for r in results],
            "norm_pass": norms,
            "largest_tensor_peak_growth": probes,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
