"""Cost benchmark: ``mergekit-nan compare`` against doing the same comparison by hand.

Both sides answer the same question on the same models and text: the ``nan``
recipe, its baseline (uniform task arithmetic) and ``nan_exponent: -1``, three
candidates, scored on one held-out ``.txt`` file.

* compare: one ``mergekit-nan compare nan.yml --data heldout.txt --exponent -1``
  process (three merges through mergekit's executor, each scored and deleted).
* by hand: three stock ``mergekit-yaml`` processes (the three recipes compare
  merged, taken from its ``--json``), each writing its model to disk, then one
  plain ``transformers`` loop over the three (``by_hand_eval.py``).

Each process is a child of this script: wall time and peak RSS (``ru_maxrss``
from ``wait4``) per process. Ratios: compare's wall over the by-hand sum, and
compare's peak RSS over the largest by-hand peak. The order of the two sides
alternates every round; medians are reported, with the load average and the
two sides' nats/token (they must agree).

The models are ``benchmarks/overhead/overhead_models.py``'s seeded Llama shapes (``--size
134m``: SmolLM-135M-shaped, bf16) with a word-level tokenizer of their
vocabulary added; the text is seeded random words of that vocabulary.

Run: ``python benchmarks/compare/cost.py --size 134m --tokens 50000`` (``--size tiny
--tokens 2000`` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "overhead"))  # its seeded model families

from overhead_load import load_average  # noqa: E402
from overhead_models import FAMILIES, build_family  # noqa: E402

DEFAULT_CACHE = HERE.parent / ".cache"
DOCUMENT_TOKENS = 500
Run = Tuple[float, int, float]
"""One child process: wall seconds, peak RSS bytes, CPU seconds."""


def _console(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found if found.exists() else shutil.which(name))


def measured(command: Sequence[str], log: Path) -> Tuple[float, int, float]:
    """Run ``command`` as a child: wall seconds, peak RSS bytes, CPU seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as stream:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[0]} failed; its log:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def add_tokenizer(paths: Sequence[Path], vocab_size: int) -> None:
    """A word-level tokenizer of the models' vocabulary in each checkpoint (once)."""
    from mergekit_nan.commands.tiny import tiny_tokenizer

    tokenizer = None
    for path in paths:
        if not (path / "tokenizer.json").exists():
            tokenizer = tokenizer or tiny_tokenizer(vocab_size)
            tokenizer.save_pretrained(path)


def write_text(path: Path, tokens: int, vocab_size: int) -> int:
    """Seeded documents of ``DOCUMENT_TOKENS`` words; returns the predicted tokens."""
    rng = random.Random(0)
    documents = max(1, round(tokens / (DOCUMENT_TOKENS - 1)))
    with open(path, "w") as file:
        for _ in range(documents):
            file.write(" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(DOCUMENT_TOKENS)))
            file.write("\n")
    return documents * (DOCUMENT_TOKENS - 1)


def compare_side(work: Path) -> Tuple[List[Tuple[float, int, float]], Dict[str, float]]:
    command = [_console("mergekit-nan"), "compare", str(work / "nan.yml"), "--data",
               str(work / "heldout.txt"), "--exponent", "-1", "--json", str(work / "c.json"),
               "--bootstrap", "1000", "-q"]  # fmt: skip
    runs = [measured(command, work / "compare.log")]
    data = json.loads((work / "c.json").read_text())
    losses = {c["label"]: c["files"][str(work / "heldout.txt")]["nll"] for c in data["candidates"]}
    return runs, losses, data


def by_hand_side(work: Path, recipes: Dict[str, Dict], tokenizer: Path):
    runs = []
    outs = []
    for number, (label, recipe) in enumerate(recipes.items()):
        path = work / f"hand{number}.yml"
        path.write_text(yaml.safe_dump(recipe))
        out = work / f"hand{number}"
        command = [_console("mergekit-yaml"), str(path), str(out), "--no-copy-tokenizer",
                   "--no-write-model-card", "--quiet"]  # fmt: skip
        runs.append(measured(command, work / f"hand{number}.log"))
        outs.append((label, out))
    command = [sys.executable, str(HERE / "by_hand_eval.py"), "--data", str(work / "heldout.txt"),
               "--tokenizer", str(tokenizer), *[str(out) for _, out in outs]]  # fmt: skip
    runs.append(measured(command, work / "eval.log"))
    printed = json.loads((work / "eval.log").read_text().strip().splitlines()[-1])
    losses = {label: printed[str(out)] for label, out in outs}
    for _, out in outs:
        shutil.rmtree(out)
    return runs, losses


def side_by_side(
    rounds: int,
    compare: Callable[[], Tuple[List[Run], Dict[str, Any], Dict[str, Any]]],
    by_hand: Callable[[Dict[str, Dict]], Tuple[List[Run], Dict[str, Any]]],
) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Dict[str, Any]]]:
    """Both sides ``rounds`` times in alternating order; each side's runs per round, and the
    values each reported (its last round's).

    ``compare()`` returns its runs, its values and its ``--json``, whose recipes the by-hand
    side merges, so compare goes first in the first round.
    """
    results: Dict[str, List[Dict[str, Any]]] = {"compare": [], "by_hand": []}
    values: Dict[str, Dict[str, Any]] = {}
    recipes: Dict[str, Dict] = {}
    for number in range(rounds):
        order = ["compare", "by_hand"] if number % 2 == 0 else ["by_hand", "compare"]
        for side in order:
            if side == "compare":
                runs, values[side], data = compare()
                recipes = {c["label"]: c["recipe"] for c in data["candidates"]}
            else:
                runs, values[side] = by_hand(recipes)
            wall, rss, cpu = (
                sum(r[0] for r in runs),
                max(r[1] for r in runs),
                sum(r[2] for r in runs),
            )
            results[side].append({"wall": wall, "rss": rss, "cpu": cpu, "runs": runs,
                                  "load": load_average()})  # fmt: skip
            print(f"round {number + 1} {side}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB, "
                  f"CPU {cpu:.1f} s (processes: {len(runs)}; load {load_average()})")  # fmt: skip
    return results, values


def print_ratios(results: Dict[str, List[Dict[str, Any]]]) -> None:
    """compare over by hand: medians of wall (summed processes), peak RSS (largest process)
    and CPU over the rounds."""
    medians = {
        side: {key: statistics.median(r[key] for r in runs) for key in ("wall", "rss", "cpu")}
        for side, runs in results.items()
    }
    wall, rss, cpu = (medians["compare"][k] / medians["by_hand"][k] for k in ("wall", "rss", "cpu"))
    rounds = len(results["compare"])
    print(f"compare / by hand: wall ratio {wall:.3f}, peak-RSS ratio {rss:.3f}, CPU ratio "
          f"{cpu:.3f} (medians of {rounds} rounds; load {load_average()})")  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="134m")
    parser.add_argument("--tokens", type=int, default=50_000, help="Held-out tokens to score")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None, help="Write every run here")
    args = parser.parse_args(argv)
    family = FAMILIES[args.size]
    paths = build_family(args.cache, args.size)
    add_tokenizer(paths, family.shape.vocab_size)
    work = args.cache / f"compare-cost-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokens = write_text(work / "heldout.txt", args.tokens, family.shape.vocab_size)
    recipe = {"merge_method": "nan", "base_model": str(paths[0]),
              "models": [{"model": str(p)} for p in paths[1:]], "dtype": "bfloat16"}  # fmt: skip
    (work / "nan.yml").write_text(yaml.safe_dump(recipe))
    print(f"{args.size}: {family.description}; {tokens} held-out tokens; load {load_average()}")
    results, losses = side_by_side(
        args.rounds,
        lambda: compare_side(work),
        lambda recipes: by_hand_side(work, recipes, paths[0]),
    )
    for label, value in losses["compare"].items():
        other = losses["by_hand"][label]
        print(f"{label}: compare {value:.6f}, by hand {other:.6f} nats/token "
              f"(relative difference {abs(value - other) / other:.1e})")  # fmt: skip
    print_ratios(results)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "losses": losses}, indent=1))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
