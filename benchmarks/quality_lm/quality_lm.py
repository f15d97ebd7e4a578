"""Language-model quality benchmark: do NAN coefficients help when merging small Llama LMs?

A byte-level ``LlamaForCausalLM`` (``quality_lm_train``, 1.9M parameters at
the full size) is pre-trained on Python standard-library source,
then fine-tuned into experts on text the base saw little of: C headers,
licence texts and package READMEs, all read from the local disk
(``quality_lm_data`` says where each comes from and how files are split). The
experts are saved as safetensors checkpoints and merged by mergekit in this
process, through the installed ``mergekit-yaml`` and ``mergekit-nan`` entry
points (``quality_lm_merges``); ``quality_lm_experiments`` runs the
experiments and ``quality_lm_report`` prints the tables.

Experiments, each in two regimes, over ``--seeds`` seeds, one shared base:

* ``three-domain``: one expert per domain on data volumes 1:4:16 (times the
  size's unit), rotated across the domains from seed to seed, so in three
  seeds every domain gets every volume once. Merged with uniform task
  arithmetic, the oracle (weights proportional to the true data volume),
  ``nan`` at tensor, layer and model granularity with exponents 1 and 2,
  ``nan_norm: weights``, ``ties``/``ties+nan`` and ``dare_ties``/``dare_ties+nan``
  (same density and ``--random-seed``); every expert alone is evaluated too.
* ``one-domain`` (the paper's first experiment): two models fine-tuned on
  disjoint 1:8 subsets of one domain (``--pair-domain``), merged with uniform
  task arithmetic, the oracle and ``nan`` (tensor p = 1, 2; model p = 1).

Regimes: ``epochs``: every expert makes the same number of passes over its
data, so steps grow with data; ``steps``: every expert makes the same number
of steps, those the ``epochs`` regime gives the geometric mean of the volumes
(the 4x expert of 1:4:16), so the smallest expert makes four times as many
passes (8 at the full size) and starts to over-fit, while still beating the
base (more passes made it worse than the base in trials).

``--lora-rank R`` trains every expert as a PEFT LoRA adapter of rank R on every linear
module (the paper's LoRA setting) and merges the adapters as adapters with ``mergekit-nan
merge`` (one LoRA adapter per merge, folded into the base to be evaluated); only the linear
methods merge adapters that way, so ``ties``, ``dare_ties`` and ``nan_norm: weights`` are
left out.

All merges use per-model weights summing to 1 and the top-level ``lambda``
(result = base + lambda * sum_i w_i x_i). Each method's ``lambda`` is chosen on
the validation split from the size's grid; the tables report the test split,
in nats per byte. Each expert must beat the base on its own domain's
validation split by ``min_gain`` of the size; the report says whether all did,
and the exit status is 1 if one did not (or if a loss is not finite).

Threads: ``--threads`` (default 1) is passed to ``torch.set_num_threads``. The
models are small, so a second thread gains little (about 1.4x on a quiet
2-core machine), while OpenMP threads that wait for a busy core slow every step
several-fold; one thread keeps the timing stable on a shared machine.

Run: ``python benchmarks/quality_lm/quality_lm.py`` (``--size full``, 3 seeds: about an
hour on one core; or about 45 minutes on two, as ``--regime epochs`` and
``--regime steps`` side by side, each with ``--json``, printed together by
``--combine``); ``--size small`` for development (a few minutes);
``--size tiny`` checks the pipeline in seconds (its numbers mean nothing).
``--compare`` adds a step to each three-domain experiment: ``mergekit-nan compare``
on its experts and test split, beside the benchmark's own numbers
(``quality_lm_compare``). Checkpoints go to ``--out`` (default ``benchmarks/.cache/quality_lm-SIZE[-REGIME]``) and
are deleted at the end unless ``--keep``, which keeps the base, the experts
and every recipe (merged checkpoints are deleted as soon as they are read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import quality_lm_data as data
import quality_lm_merges as merges
import quality_lm_train as train
import torch
from quality_lm_experiments import EXPERIMENTS, REGIMES, Run
from quality_lm_report import Header, from_json, machine, report, to_json


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(train.SIZES), default="full")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default: the size's)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="run seeds FIRST.. (to split a long run)"
    )
    parser.add_argument("--regime", choices=(*REGIMES, "both"), default="both")
    parser.add_argument("--experiment", choices=(*EXPERIMENTS, "both"), default="both")
    domains = [c.name for c in data.DOMAINS]
    parser.add_argument("--pair-domain", choices=domains, default="package-docs")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train the experts as LoRA adapters of this rank and merge them as adapters "
        "(mergekit-nan merge; the linear methods only); 0: full fine-tunes",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (checkpoints)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--keep", action="store_true", help="keep base, experts and recipes")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run mergekit-nan compare on each three-domain experiment's experts and "
        "test split (nan at its chosen lambda, --exponent -1)",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="with --compare: also score a multiple-choice task per domain built from its test "
        "split (compare --task; needs lm-eval)",
    )
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the report of earlier runs' --json files together and exit "
        "(e.g. --regime epochs and --regime steps run side by side, one per core)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: runs, prints the Markdown report, returns the exit status."""
    args = _arguments(argv)
    if args.combine:
        record, header = from_json([json.loads(path.read_text()) for path in args.combine])
        print(report(record, header))
        if args.json is not None:
            args.json.write_text(json.dumps(to_json(record, header), indent=1))
        return 0
    settings = train.SIZES[args.size]
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=args.seeds)
    if args.lora_rank:
        settings = dataclasses.replace(settings, lora_rank=args.lora_rank)
    torch.set_num_threads(args.threads)
    train.quiet_transformers()
    # Runs of one regime or experiment get their own default directory, so they can run side by side.
    parts = [args.size] + [part for part in (args.regime, args.experiment) if part != "both"]
    parts += [f"lora{args.lora_rank}"] if args.lora_rank else []
    default = Path(__file__).resolve().parent.parent / ".cache" / f"quality_lm-{'-'.join(parts)}"
    work = (args.out or default).resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    experiments = EXPERIMENTS if args.experiment == "both" else (args.experiment,)
    started = time.perf_counter()
    try:
        try:
            run = Run(
                settings, work, args.pair_domain, compare=args.compare, accuracy=args.accuracy
            )
        except data.CorpusError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for seed in range(args.first_seed, args.first_seed + settings.seeds):
            for regime in regimes:
                if "three-domain" in experiments:
                    run.three_domain(regime, seed)
                if "one-domain" in experiments:
                    run.one_domain(regime, seed)
    finally:
        if not args.keep:
            for path in [work / "base", *sorted(work.glob("seed*"))]:
                shutil.rmtree(path, ignore_errors=True)
            if created and not any(work.iterdir()):
                work.rmdir()
    header = Header(
        machine=machine(),
        threads=args.threads,
        size=args.size,
        settings=dataclasses.asdict(settings),
        parameters=train.parameter_count(settings),
        seeds=settings.seeds,
        first_seed=args.first_seed,
        wall_s=time.perf_counter() - started,
        merges=run.merger.calls,
        lambda_grid=list(merges.lambda_grid(settings.lambdas)),
        pool_val_loss=run.pool_loss,
    )
    print(report(run.record, header))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(run.record, header), indent=1))
    values = [v for seeds in run.record.losses.values() for v in seeds.values()]
    finite = bool(values) and all(math.isfinite(v) for v in values)
    return 0 if finite and not run.record.failures else 1


if __name__ == "__main__":
    sys.exit(main())
