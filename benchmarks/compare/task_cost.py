"""Cost benchmark: ``mergekit-nan compare --task`` against the same comparison by hand with lm-eval.

Both sides answer the same question on the same models and two local lm-eval tasks
(a multiple-choice task and a generate-until exact-match task over seeded words of
the models' vocabulary): the ``nan`` recipe, its baseline (uniform task arithmetic)
and ``nan_exponent: -1``, three candidates.

* compare: one ``mergekit-nan compare nan.yml --task mc.yaml --task gen.yaml
  --exponent -1`` process (three merges, each loaded once and scored on both tasks
  through lm-eval's ``HFLM`` around the loaded model).
* by hand: three stock ``mergekit-yaml`` processes (the three recipes compare merged,
  from its ``--json``), then ``lm_eval --model hf`` on each merged model (three
  processes, each starting an interpreter and loading its model).

Each process is a child of this script (``cost.measured``): wall time and peak RSS
per process. Ratios: compare's wall over the by-hand sum, compare's peak RSS over
the largest by-hand peak; the two sides' task scores must agree.

Run: ``python benchmarks/compare/task_cost.py --size 134m`` (``--size tiny`` for a
quick check).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "overhead"))

from cost import _console, add_tokenizer, measured, print_ratios, side_by_side  # noqa: E402
from overhead_load import load_average  # noqa: E402
from overhead_models import FAMILIES, build_family  # noqa: E402

DEFAULT_CACHE = HERE.parent / ".cache"
TASKS = ("bench_mc", "bench_gen")

MC = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, vocab_size: int, documents: int) -> None:
    """The two task YAML files and their ``.jsonl`` data, seeded."""
    rng = random.Random(0)

    def words(count: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(count))

    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"context": words(24), "choices": [words(4) for _ in range(4)], "gold": rng.randrange(4)}
          for _ in range(documents)]  # fmt: skip
    gen = [{"question": words(24), "answer": words(1)} for _ in range(documents // 2)]
    for name, rows, body in (("bench_mc", mc, MC), ("bench_gen", gen, GEN)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
            f"  data_files:\n    test: {data}\ntest_split: test\n{body}"
        )


def compare_side(work: Path) -> Tuple[List[Tuple[float, int, float]], Dict[str, Dict], Dict]:
    command = [_console("mergekit-nan"), "compare", str(work / "nan.yml"),
               "--task", str(work / "tasks" / "bench_mc.yaml"),
               "--task", str(work / "tasks" / "bench_gen.yaml"), "--exponent", "-1",
               "--json", str(work / "c.json"), "--bootstrap", "1000", "-q"]  # fmt: skip
    runs = [measured(command, work / "compare.log")]
    data = json.loads((work / "c.json").read_text())
    scores = {c["label"]: {t: c["tasks"][t]["value"] for t in TASKS} for c in data["candidates"]}
    return runs, scores, data


def by_hand_side(work: Path, recipes: Dict[str, Dict]):
    runs, scores = [], {}
    for number, (label, recipe) in enumerate(recipes.items()):
        path = work / f"hand{number}.yml"
        path.write_text(yaml.safe_dump(recipe))
        out = work / f"hand{number}"
        command = [_console("mergekit-yaml"), str(path), str(out), "--no-write-model-card",
                   "--quiet"]  # fmt: skip
        runs.append(measured(command, work / f"hand{number}.log"))
        results = work / f"lm{number}"
        command = [_console("lm_eval"), "--model", "hf", "--model_args",
                   f"pretrained={out},dtype=auto", "--device", "cpu", "--batch_size", "8",
                   "--include_path", str(work / "tasks"), "--tasks", ",".join(TASKS),
                   "--output_path", str(results)]  # fmt: skip
        runs.append(measured(command, work / f"lm{number}.log"))
        (found,) = results.rglob("results_*.json")
        reported = json.loads(found.read_text())["results"]
        metrics = {"bench_mc": "acc,none", "bench_gen": "exact_match,none"}
        scores[label] = {t: reported[t][metrics[t]] for t in TASKS}
        shutil.rmtree(out)
        shutil.rmtree(results)
    return runs, scores


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FAMILIES), default="134m")
    parser.add_argument("--documents", type=int, default=200, help="Multiple-choice documents")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, the order alternating")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None, help="Write every run here")
    args = parser.parse_args(argv)
    family = FAMILIES[args.size]
    paths = build_family(args.cache, args.size)
    add_tokenizer(paths, family.shape.vocab_size)
    work = args.cache / f"compare-task-cost-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_tasks(work / "tasks", family.shape.vocab_size, args.documents)
    recipe = {"merge_method": "nan", "base_model": str(paths[0]),
              "models": [{"model": str(p)} for p in paths[1:]], "dtype": "bfloat16"}  # fmt: skip
    (work / "nan.yml").write_text(yaml.safe_dump(recipe))
    print(f"{args.size}: {family.description}; tasks: {args.documents} multiple-choice and "
          f"{args.documents // 2} generate-until documents; load {load_average()}")  # fmt: skip
    results, scores = side_by_side(
        args.rounds, lambda: compare_side(work), lambda recipes: by_hand_side(work, recipes)
    )
    for label, values in scores["compare"].items():
        print(f"{label}: compare {values}, by hand {scores['by_hand'][label]}")
    print_ratios(results)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "scores": scores}, indent=1))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
