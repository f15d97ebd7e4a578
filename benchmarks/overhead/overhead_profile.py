"""Where a merge's time goes: ``nan`` next to ``linear``, in one process, under cProfile.

Builds (or reuses) an overhead-benchmark family, then runs mergekit's
``run_merge`` (what ``mergekit-yaml`` runs) for each recipe under cProfile,
alternating, and prints per recipe the wall time, the CPU time, the minor page
faults and the cumulative seconds of the steps a merge is made of:

* ``guard``: the plugin's checks before the merge (``_check_merge``);
* ``load``: mergekit reading input tensors (``LoadTensor.execute``);
* ``merge``: the merge kernel (``ExecuteMergeMethodTask.execute``), and within
  it ``norm pass`` (the plugin's norms) and its torch kernels: ``convert``
  (``copy_``), ``subtract`` (``sub_``), ``row norms`` (``linalg_vector_norm``);
* ``save``: mergekit writing the output (``SaveTensor.execute`` and the writer).

Then the ``--top`` functions by own time. The profiler itself slows Python-heavy
code down, so the seconds are for comparing steps, not for the overhead ratio
(``overhead.py`` measures that without a profiler). A sampling profiler gives a
second opinion: ``py-spy record --format raw -o out.txt -- python
benchmarks/overhead/overhead_profile.py --recipes nan``.

Run: ``python benchmarks/overhead/overhead_profile.py --size 134m --recipes "nan (no base)" "linear (no base)"``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import DEFAULT_CACHE, merge_configs  # noqa: E402
from overhead_models import FAMILIES, build_family  # noqa: E402

STEPS: Dict[str, Tuple[str, ...]] = {
    "guard": ("_check_merge",),
    "load": ("LoadTensor.execute",),
    "merge": ("ExecuteMergeMethodTask.execute",),
    "norm pass": ("frobenius_norms", "norms_and_sums"),
    "convert (copy_)": ("copy_",),
    "subtract (sub_)": ("sub_",),
    "row norms (linalg_vector_norm)": ("linalg_vector_norm",),
    "save": ("SaveTensor.execute", "FinalizeModel.execute"),
}
"""Step -> function names (``Class.method`` or a function or builtin method name)."""


def _label(key: Tuple[str, int, str]) -> str:
    """``Class.method`` when cProfile's key tells the class, else the function name."""
    filename, _, name = key
    if name.startswith("<method '") or name.startswith("<built-in method "):
        return name.split("'")[1] if "'" in name else name.split()[-1].rstrip(">")
    return name


def _cumulative(stats: pstats.Stats, names: Sequence[str]) -> float:
    """Seconds inside any function called one of ``names`` (outermost calls only)."""
    total = 0.0
    for key, (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
        label = _label(key)
        qualified = f"{Path(key[0]).stem}.{label}"
        matches = [n for n in names if n == label or qualified.endswith(n)]
        if not matches:
            continue
        recursive = any(_label(c) in names for c in callers)
        if not recursive:
            total += cumulative
    return total


def _qualify(stats: pstats.Stats) -> None:
    """Name methods ``Class.method`` where the source tells (cProfile gives the bare name)."""
    import linecache

    renamed = {}
    for key, value in stats.stats.items():  # type: ignore[attr-defined]
        filename, line, name = key
        owner = None
        for number in range(line, 0, -1):
            text = linecache.getline(filename, number)
            if text.startswith("class "):
                owner = text.split()[1].split("(")[0].split(":")[0]
                break
            if text and not text[0].isspace() and not text.startswith(("@", "#")) and number < line:
                break
        renamed[(filename, line, f"{owner}.{name}" if owner else name)] = value
    stats.stats = renamed  # type: ignore[attr-defined]


def profile_merge(config: Dict[str, object]) -> Dict[str, float]:
    """Run ``run_merge`` on ``config`` under cProfile; its steps' seconds."""
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    out = Path(tempfile.mkdtemp(prefix="overhead-profile-")) / "merged"
    profiler = cProfile.Profile()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    profiler.enable()
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    LoaderCache().flush_all()
    LoaderCache().loaders.clear()
    shutil.rmtree(out.parent)
    stats = pstats.Stats(profiler)
    _qualify(stats)
    found = {"wall": wall, "cpu": cpu, "minor faults": float(faults)}
    for step, names in STEPS.items():
        found[step] = _cumulative(stats, names)
    found["_stats"] = stats  # type: ignore[assignment]
    return found


def report(results: Dict[str, List[Dict[str, float]]], top: int) -> str:
    """Median per step and recipe, as a Markdown table, and the top functions by own time."""
    import statistics

    recipes = list(results)
    rows = ["wall", "cpu", "minor faults", *STEPS]
    lines = ["| step | " + " | ".join(recipes) + " |", "| --- |" + " --- |" * len(recipes)]
    for row in rows:
        cells = []
        for recipe in recipes:
            value = statistics.median(r[row] for r in results[recipe])
            cells.append(f"{value:,.0f}" if row == "minor faults" else f"{value:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for recipe in recipes:
        lines += ["", f"{recipe}: top {top} functions by own time (last round)", "```"]
        stats = results[recipe][-1]["_stats"]  # type: ignore[index]
        entries = sorted(
            stats.stats.items(),  # type: ignore[attr-defined]
            key=lambda item: -item[1][2],
        )[:top]
        for key, (_, calls, own, cumulative, _) in entries:
            lines.append(
                f"{own:8.3f} s own {cumulative:8.3f} s cum {calls:8d} calls  {_label(key)}"
            )
        lines.append("```")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="134m")
    parser.add_argument(
        "--recipes", nargs="+", default=["nan (no base)", "linear (no base)"], help="recipe names"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--top", type=int, default=12, help="functions listed by own time")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model cache folder")
    args = parser.parse_args(argv)
    import mergekit_nan  # noqa: F401  (the installed hook does it too)

    paths = build_family(args.cache, args.size)
    configs = merge_configs(paths)
    unknown = [r for r in args.recipes if r not in configs]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {sorted(configs)}")
    results: Dict[str, List[Dict[str, float]]] = {r: [] for r in args.recipes}
    for number in range(args.rounds):
        order = args.recipes if number % 2 == 0 else args.recipes[::-1]
        for recipe in order:
            results[recipe].append(profile_merge(configs[recipe]))
            print(f"round {number} {recipe}: {results[recipe][-1]['wall']:.2f} s", file=sys.stderr)
    print(report(results, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
