"""What compare's shared norm pass saves: a candidate merged with an earlier one's norms, or alone.

``mergekit-nan compare`` merges candidates that differ only in ``nan_exponent``,
``lambda`` or ``nan_granularity``; the first runs the norm pass and the later ones
take its norms (``mergekit_nan.shared_norms``). This script merges two such
candidates of a ``nan`` recipe in this process, side by side, each alone (its
own norm pass) and with the norm table a merge of the recipe itself filled:

* ``nan_exponent: -1`` (tensor granularity: the norms inside the merge);
* ``nan_granularity: layer`` (the measuring pass before the merge, then the
  merge of the frozen recipe).

Every round checks that both ways write the same tensors, bit for bit. The
order alternates per round; medians of the wall time. The models are
``benchmarks/overhead/overhead_models.py``'s seeded Llama shapes.

Run: ``python benchmarks/compare/shared_norms.py --size 134m --rounds 3``
(``--size tiny --rounds 1`` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "overhead"))  # its seeded model families

from overhead_load import load_average  # noqa: E402
from overhead_models import FAMILIES, build_family  # noqa: E402

from mergekit_nan.commands.merge.run import merge_recipe  # noqa: E402
from mergekit_nan.shared_norms import NormTable, sharing  # noqa: E402

DEFAULT_CACHE = HERE.parent / ".cache"
OPTIONS = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
CANDIDATES = {"nan_exponent -1": {"nan_exponent": -1.0}, "nan_granularity layer": {
    "nan_granularity": "layer"}}  # fmt: skip


def _merge(recipe: Dict, out: Path, table: Optional[NormTable]) -> float:
    """Wall seconds of one merge of ``recipe`` into ``out`` (with ``table`` shared, if given)."""
    LoaderCache().flush_all()
    LoaderCache().loaders.clear()  # each merge opens its inputs itself
    config = MergeConfiguration.model_validate(recipe)
    started = time.perf_counter()
    if table is None:
        merge_recipe(config, str(out), OPTIONS)
    else:
        with sharing(table):
            merge_recipe(config, str(out), OPTIONS)
    return time.perf_counter() - started


def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    found: Dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _same(a: Path, b: Path) -> bool:
    first, second = _tensors(a), _tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="134m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None, help="Write every run here")
    args = parser.parse_args(argv)
    family = FAMILIES[args.size]
    paths = build_family(args.cache, args.size)
    work = args.cache / f"compare-shared-norms-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = {"merge_method": "nan", "base_model": str(paths[0]),
              "models": [{"model": str(p)} for p in paths[1:]], "dtype": "bfloat16"}  # fmt: skip
    print(f"{args.size}: {family.description}; load {load_average()}; "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    table = NormTable()
    first = _merge(recipe, work / "recipe", table)
    print(f"the recipe itself, filling the table: {first:.2f} s ({table.computed} tensor groups)")
    runs: Dict[str, Dict[str, List[float]]] = {}
    same: Dict[str, bool] = {}
    for number in range(args.rounds):
        for label, parameters in CANDIDATES.items():
            candidate = {**recipe, "parameters": parameters}
            ways = ["alone", "shared"] if number % 2 == 0 else ["shared", "alone"]
            for way in ways:
                seconds = _merge(candidate, work / way, table if way == "shared" else None)
                runs.setdefault(label, {}).setdefault(way, []).append(seconds)
            same[label] = same.get(label, True) and _same(work / "alone", work / "shared")
            for way in ways:
                shutil.rmtree(work / way)
        print(f"round {number + 1}: " + "; ".join(
            f"{label} alone {r['alone'][-1]:.2f} s, shared {r['shared'][-1]:.2f} s"
            for label, r in runs.items()) + f" (load {load_average()})")  # fmt: skip
    print()
    print("| candidate | alone (s) | with the shared norms (s) | shared / alone | same tensors |")
    print("|---|---|---|---|---|")
    for label, r in runs.items():
        alone, shared = statistics.median(r["alone"]), statistics.median(r["shared"])
        print(f"| {label} | {alone:.2f} | {shared:.2f} | {shared / alone:.3f} | "
              f"{'yes' if same[label] else 'NO'} |")  # fmt: skip
    print(f"\nmedians of {args.rounds} rounds; norms reused {table.reused} times; "
          f"load {load_average()}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "same": same, "first": first}, indent=1))
    shutil.rmtree(work)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
