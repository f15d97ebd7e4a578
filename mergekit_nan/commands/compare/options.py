"""The options of ``mergekit-nan compare`` (click only: imported when the CLI starts)."""

from __future__ import annotations

from typing import Callable, List

import click

from mergekit_nan.commands.common.options import apply_options, mergekit_option, reading_options

__all__ = ["compare_options", "task_options"]


def task_options() -> List[Callable]:
    """The ``--task`` options (lm-evaluation-harness; the ``tasks`` extra)."""
    return [
        click.option(
            "--task",
            "tasks",
            multiple=True,
            help="An lm-eval task or group name, or a task YAML file: score every candidate in "
            "its metric too (repeatable; needs 'mergekit-nan[tasks]')",
        ),
        click.option(
            "--include-path",
            type=click.Path(file_okay=False),
            default=None,
            help="A folder of lm-eval task YAML files, as lm-eval's own option",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="A seeded sample of at most this many documents per task (by --seed)",
        ),
        click.option(
            "--num-fewshot", type=click.IntRange(min=0), default=None, help="Few-shot examples"
        ),
        click.option(
            "--apply-chat-template", is_flag=True, help="Render task prompts with the chat template"
        ),
        click.option(
            "--gen-kwargs",
            default=None,
            help="Generation settings for generate-until tasks (temperature=0,max_gen_toks=64)",
        ),
        click.option(
            "--metric",
            default=None,
            help="The task metric that decides [default: each task's first mean metric]",
        ),
        click.option(
            "--task-batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="lm-eval's batch size",
        ),
    ]


def compare_options(command: Callable) -> Callable:
    """Apply every option of ``mergekit-nan compare`` to ``command``."""
    options = [
        click.option(
            "--data",
            multiple=True,
            help="Held-out documents: .txt (a line each), .jsonl (text or messages), .parquet, .csv "
            "or a saved datasets directory (a text column); repeat for several files",
        ),
        *task_options(),
        click.option(
            "--exponent", default=None, help="Also merge with these nan_exponent values (1,0,-1)"
        ),
        click.option(
            "--lambda", "lambdas", default=None, help="Also merge with these lambda values"
        ),
        click.option(
            "--granularity",
            default=None,
            help="Also merge at these granularities (tensor,layer,model)",
        ),
        click.option(
            "--against", multiple=True, help="Another recipe over the same models (repeatable)"
        ),
        click.option(
            "--inputs", is_flag=True, help="Also evaluate the base and every input model alone"
        ),
        click.option(
            "--max-length",
            type=click.IntRange(min=2),
            default=1024,
            show_default=True,
            help="Tokens kept per document",
        ),
        click.option(
            "--max-documents",
            type=click.IntRange(min=1),
            default=None,
            help="A seeded sample of at most this many documents per file",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the bootstrap, the half split and --max-documents",
        ),
        click.option(
            "--bootstrap",
            type=click.IntRange(min=10),
            default=1000,
            show_default=True,
            help="Bootstrap resamples",
        ),
        click.option(
            "--batch-tokens",
            type=click.IntRange(min=1),
            default=1024,
            show_default=True,
            help="Padded tokens per evaluation batch",
        ),
        click.option(
            "--json", "json_file", default=None, help="Write every number to this JSON file"
        ),
        click.option("--csv", "csv_file", default=None, help="Write the table to this CSV file"),
        click.option(
            "--plot", "plot_file", default=None, help="Write a PNG of the losses (matplotlib)"
        ),
        click.option(
            "--keep",
            type=click.Path(file_okay=False),
            default=None,
            help="Write the winning merge here, as mergekit-nan merge would",
        ),
        click.option("--overwrite", is_flag=True, help="Let --keep replace a non-empty directory"),
        click.option(
            "--work-dir",
            type=click.Path(file_okay=False, exists=True),
            default=None,
            help="Where each merge lives while it is evaluated [default: the temp directory]",
        ),
        mergekit_option("random_seed"),
        *reading_options(
            device="Merge and evaluate on this device (e.g. cuda:0)",
            cuda="Merge and evaluate on the GPU(s)",
            multi_gpu="Merge with mergekit's multi-GPU executor",
        ),
    ]
    return apply_options(command, options)
