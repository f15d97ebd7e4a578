"""Overhead benchmark: what NAN coefficients cost on top of the stock mergekit methods.

Builds (under ``benchmarks/.cache/``) a seeded Llama-shaped base model and
fine-tunes (base plus Gaussian task vectors), sharded bf16 safetensors: about
374M parameters and three fine-tunes at ``--size full``, a Llama-3.2-3B shape
(3.21B parameters, tied embeddings) and two fine-tunes at ``--size 3b``. Then,
in one run, alternates A/B pairs, one child process per merge, so wall time and
peak RSS (``ru_maxrss`` from ``wait4``) are per merge:

* ``nan`` vs ``linear`` (same checkpoints, equal weights), stock ``mergekit-yaml``
* ``ties+nan`` vs ``ties`` (same densities), stock ``mergekit-yaml``
* ``dare_ties+nan`` vs ``dare_ties`` (same densities, same ``--random-seed``)
* ``mergekit-nan merge --granularity model`` vs ``mergekit-yaml`` on the ``nan``
  recipe (the cost of the extra streaming pass), when that command exists

The order inside a pair alternates every round; medians are reported.

It also measures how much the peak RSS grows while each method merges the
largest tensor (a fresh process per probe), and times the coefficient pass
alone (``frobenius_norms`` over every tensor, task-vector mode) against a plain
read of the same in-memory tensors (one float32 reduction over each).

The built checkpoints are deleted at the end unless ``--keep`` is given.

Run: ``python benchmarks/overhead/overhead.py`` (``--size tiny`` for a quick check;
``--cuda`` passes ``--cuda`` to the merges and times the coefficient pass on
the GPU, and needs a CUDA device). ``--size-table A.json B.json ...`` prints
peak RSS against model size from the ``--json`` files of earlier runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead_kernels import DENSITY, RANDOM_SEED, measure_norm_pass, probe_peak  # noqa: E402
from overhead_load import busy_processes, load_average  # noqa: E402
from overhead_models import FAMILIES, build_family, family_root  # noqa: E402
from overhead_report import Measurement, machine, report, size_table  # noqa: E402
from overhead_runs import run_merge, warm_page_cache  # noqa: E402

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"
COMMON_FLAGS = ("--no-copy-tokenizer", "--no-write-model-card")


@dataclass(frozen=True)
class Variant:
    """One side of a pair: a display name, the recipe it merges and the command that runs it."""

    name: str
    recipe: str
    command: str
    """``yaml`` (stock ``mergekit-yaml``) or ``merge-model`` (``mergekit-nan merge``)."""


def _stock(recipe: str) -> Variant:
    return Variant(recipe, recipe, "yaml")


PAIRS: Dict[str, Tuple[Variant, Variant]] = {
    "nan": (_stock("nan"), _stock("linear")),
    "nan-no-base": (_stock("nan (no base)"), _stock("linear (no base)")),
    "ties": (_stock("ties+nan"), _stock("ties")),
    "dare_ties": (_stock("dare_ties+nan"), _stock("dare_ties")),
    "merge-model": (
        Variant("nan [mergekit-nan merge --granularity model]", "nan", "merge-model"),
        Variant("nan [mergekit-yaml]", "nan", "yaml"),
    ),
}
DEFAULT_PAIRS = {
    "tiny": "nan,nan-no-base,ties,dare_ties,merge-model",
    "134m": "nan-no-base,ties,dare_ties",
    "full": "nan,ties,dare_ties,merge-model",
    "3b": "nan,ties",
}


def merge_configs(paths: Sequence[Path]) -> Dict[str, Dict[str, object]]:
    """The mergekit recipes, keyed by method name."""
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
        "linear (no base)": {
            "merge_method": "linear",
            "models": models({"weight": 1.0}),
            "dtype": "bfloat16",
        },
        "nan (no base)": {"merge_method": "nan", "models": models({}), "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "models": models({"weight": 1.0, **sparse}), **common},
        "ties+nan": {"merge_method": "ties+nan", "models": models(sparse), **common},
        "dare_ties": {
            "merge_method": "dare_ties",
            "models": models({"weight": 1.0, **sparse}),
            **common,
        },
        "dare_ties+nan": {"merge_method": "dare_ties+nan", "models": models(sparse), **common},
    }


def _slug(name: str) -> str:
    """A recipe name as a file name: ``nan (no base)`` -> ``nan_no_base``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _script(name: str) -> Optional[str]:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@functools.cache
def merge_model_flags() -> Optional[Tuple[str, ...]]:
    """Flags of ``mergekit-nan merge`` shared with the stock side, or None if it is absent.

    Read from the installed command's click definition (no child process).
    """
    found = entry_points(group="console_scripts", name="mergekit-nan")
    if _script("mergekit-nan") is None or not found:
        return None
    merge = getattr(next(iter(found)).load(), "commands", {}).get("merge")
    if merge is None:
        return None
    declared = {n for p in merge.params for n in (*p.opts, *p.secondary_opts)}
    return tuple(flag for flag in COMMON_FLAGS if flag in declared)


def command_for(variant: Variant, config: Path, out: Path, extra: Sequence[str]) -> List[str]:
    """The child's command line for one merge."""
    if variant.command == "merge-model":
        flags = merge_model_flags() or ()
        script = _script("mergekit-nan")
        command = [str(script), "merge", str(config), str(out), "--granularity", "model"]
        return command + [*flags, *extra]
    script = _script("mergekit-yaml")
    if script is None:
        raise SystemExit("mergekit-yaml is not installed")
    return [script, str(config), str(out), *COMMON_FLAGS, *extra]


def measure_merges(
    paths: Sequence[Path],
    work: Path,
    rounds: range,
    pairs: Sequence[Tuple[Variant, Variant]],
    extra: Sequence[str],
    done: Sequence[Measurement] = (),
    save: Callable[[List[Measurement]], None] = lambda results: None,
) -> List[Measurement]:
    """All pairs in each of ``rounds``; the order inside a pair flips with the round's parity.

    Merges already in ``done`` (same round, pair and method) are not run again;
    ``save`` gets every result so far after each merge.
    """
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, config in merge_configs(paths).items():
        files[name] = work / f"{_slug(name)}.yml"
        files[name].write_text(yaml.safe_dump(config))
    results = list(done)
    measured = {(r.round, r.pair, r.method) for r in done}
    for number in rounds:
        for pair in pairs:
            label = f"{pair[0].name} vs {pair[1].name}"
            for variant in pair if number % 2 == 0 else pair[::-1]:
                if (number, label, variant.name) in measured:
                    continue
                out = work / f"out-{_slug(variant.recipe)}-{variant.command}"
                command = command_for(variant, files[variant.recipe], out, extra)
                wall, rss, anon, mapped, cpu = run_merge(command, out)
                results.append(
                    Measurement(label, variant.name, number, wall, rss, anon, mapped, cpu)
                )
                save(results)
                print(
                    f"round {number} {variant.name:>14}: {wall:7.2f} s, {rss / 2**30:6.3f} GiB",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def measure_probes(
    repeats: int, cache: Path, size: str, pairs: Sequence[Tuple[Variant, Variant]]
) -> Dict[str, List[int]]:
    """Peak growth of each stock-recipe method on the largest tensor, a fresh child per probe."""
    results: Dict[str, List[int]] = {}
    methods = [tuple(v.recipe for v in pair) for pair in pairs if pair[0].command == "yaml"]
    for number in range(repeats):
        for pair in methods:
            for method in pair if number % 2 == 0 else pair[::-1]:
                command = [sys.executable, __file__, "--cache", str(cache), "--size", size]
                command += ["--probe", method]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                results.setdefault(method, []).append(int(output.stdout.strip()))
    return results


def _pairs(spec: str, parser: argparse.ArgumentParser) -> List[Tuple[Variant, Variant]]:
    keys = [key.strip() for key in spec.split(",") if key.strip()]
    unknown = [key for key in keys if key not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    return [PAIRS[key] for key in keys]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="full")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per pair")
    parser.add_argument(
        "--first-round", type=int, default=0, help="number of the first round (odd: B first)"
    )
    parser.add_argument(
        "--out-shard-size", default=None, help="passed to both sides (mergekit's default: 5B)"
    )
    parser.add_argument(
        "--pairs", default=None, help=f"comma list from {sorted(PAIRS)} (default: per size)"
    )
    parser.add_argument("--norm-repeats", type=int, default=3, help="repeats of the norm pass")
    parser.add_argument("--cuda", action="store_true", help="merge and time norms on the GPU")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model cache folder")
    parser.add_argument("--keep", action="store_true", help="keep the built checkpoints")
    parser.add_argument("--skip-merges", action="store_true", help="no whole merges")
    parser.add_argument("--probe-repeats", type=int, default=3, help="largest-tensor probes")
    parser.add_argument("--json", type=Path, default=None, help="write results here, as they come")
    parser.add_argument(
        "--resume", action="store_true", help="keep the merges already in --json, run the rest"
    )
    parser.add_argument(
        "--size-table", type=Path, nargs="+", default=None, help="print RSS vs size from JSONs"
    )
    parser.add_argument(
        "--busy", type=int, default=0, help="busy background processes during the merges"
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_table:
        print("\n".join(size_table([json.loads(p.read_text()) for p in args.size_table])))
        return 0
    if args.probe is not None:
        print(probe_peak(build_family(args.cache, args.size), args.probe))
        return 0
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA device; none is visible to torch")
    if args.resume and args.json is None:
        parser.error("--resume needs --json")
    device = "cuda" if args.cuda else "cpu"
    pairs = _pairs(args.pairs or DEFAULT_PAIRS[args.size], parser)
    notes = []
    if any(pair[0].command == "merge-model" for pair in pairs) and merge_model_flags() is None:
        notes.append(
            "`mergekit-nan merge` is not installed: the --granularity model pair is skipped"
        )
        print(notes[-1], file=sys.stderr)
        pairs = [pair for pair in pairs if pair[0].command != "merge-model"]
    labels = [(a.name, b.name) for a, b in pairs]
    done = _resumed(args.json, args.size) if args.resume else []
    load = load_average()

    def save(results: Sequence[Measurement], **rest: object) -> None:
        if args.json is not None:
            shard = args.out_shard_size or "5B (default)"
            payload = _payload(
                args.size, labels, results, load, out_shard_size=shard, busy=args.busy, **rest
            )
            args.json.write_text(json.dumps(payload, indent=1))

    paths = build_family(args.cache, args.size)
    work = args.cache / f"work-{args.size}"
    try:
        warm_page_cache(paths)
        extra = ["--random-seed", str(RANDOM_SEED)] + (["--cuda"] if args.cuda else [])
        if args.out_shard_size is not None:
            extra += ["--out-shard-size", args.out_shard_size]
        rounds = range(args.first_round, args.first_round + args.rounds)
        with busy_processes(0 if args.skip_merges else args.busy):
            results = (
                list(done)
                if args.skip_merges
                else measure_merges(paths, work, rounds, pairs, extra, done, save)
            )
            load_during = load_average()
        probes = (
            measure_probes(args.probe_repeats, args.cache, args.size, pairs)
            if args.probe_repeats
            else {}
        )
        norms = measure_norm_pass(paths, args.norm_repeats, device) if args.norm_repeats else None
    finally:
        if not args.keep:
            shutil.rmtree(family_root(args.cache, args.size), ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    save(results, norm_pass=norms, largest_tensor_peak_growth=probes)
    family = FAMILIES[args.size]
    notes.append(f"load average at the start: {load}")
    if args.busy:
        notes.append(
            f"{args.busy} busy background processes (a deterministic integer loop) during "
            f"the merges; load average at their end: {load_during}"
        )
    if args.out_shard_size is not None:
        notes.append(f"--out-shard-size {args.out_shard_size} on both sides")
    print(
        report(
            machine(),
            family.description,
            family.shape.parameters(),
            family.inputs,
            labels,
            results,
            norms,
            device,
            probes,
            notes,
        )
    )
    return 0


def _payload(
    size: str,
    labels: Sequence[Tuple[str, str]],
    results: Sequence[Measurement],
    load_at_start: str,
    **rest: object,
) -> Dict[str, object]:
    """The ``--json`` contents: machine, model, merges so far and any further results."""
    family = FAMILIES[size]
    largest, largest_numel = family.shape.largest_tensor()
    return {
        "machine": {**machine(), "load_at_start": load_at_start},
        "model": {
            "size": size,
            "description": family.description,
            "parameters": family.shape.parameters(),
            "inputs": family.inputs,
            "largest_tensor": largest,
            "largest_numel": largest_numel,
        },
        "pairs": [f"{a} vs {b}" for a, b in labels],
        "merges": [asdict(r) for r in results],
        **rest,
    }


def _resumed(path: Path, size: str) -> List[Measurement]:
    """Merges of an earlier, interrupted run of the same size (none if there is no file)."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    if payload["model"]["size"] != size:
        raise SystemExit(f"{path} holds a {payload['model']['size']} run, not {size}")
    return [Measurement(**merge) for merge in payload["merges"]]


if __name__ == "__main__":
    sys.exit(main())
