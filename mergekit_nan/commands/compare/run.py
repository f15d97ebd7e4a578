"""``mergekit-nan compare``'s steps in order, behind the click command.

Everything that can be wrong (sweep values, recipes, models, tokenizers,
data files, tasks) is found by :func:`plan_comparison` before the first merge;
:func:`compare` then merges and evaluates, writes the requested files (each
whole or not at all) and, with ``keep``, the winner as a model through the
same atomic path as ``mergekit-nan merge``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from mergekit import merge_methods
from mergekit.options import MergeOptions

from mergekit_nan.commands.common.output import write_files
from mergekit_nan.commands.compare import report as compare_report
from mergekit_nan.commands.compare.candidates import build_candidates, parse_values
from mergekit_nan.commands.compare.score import merge_candidate, run_compare
from mergekit_nan.commands.compare.settings import CompareSettings, Prepared, prepare
from mergekit_nan.commands.compare.summary import Summary, summarize
from mergekit_nan.commands.compare.task_summary import with_tasks
from mergekit_nan.commands.compare.tasks import TaskSettings, plan_tasks
from mergekit_nan.doctor.heldout import check_distinct
from mergekit_nan.parameters import NAN_GRANULARITIES
from mergekit_nan.recipe import RecipeFile, read_recipe
from mergekit_nan.registration import register_methods

__all__ = ["CompareOutputs", "Sweeps", "compare", "plan_comparison"]


@dataclass(frozen=True)
class Sweeps:
    """The command's candidate options, as typed (comma-separated values)."""

    exponents: Optional[str] = None
    lambdas: Optional[str] = None
    granularities: Optional[str] = None
    against: Sequence[Union[str, RecipeFile]] = ()
    inputs: bool = False


@dataclass(frozen=True)
class CompareOutputs:
    """Where to write the JSON, CSV, plot and the winning model (None: not written)."""

    json_file: Optional[str] = None
    csv_file: Optional[str] = None
    plot_file: Optional[str] = None
    keep: Optional[str] = None
    overwrite: bool = False


def _read(source: Union[str, RecipeFile]) -> RecipeFile:
    return source if isinstance(source, RecipeFile) else read_recipe(source)


def _takes_lambda(method_name: str) -> bool:
    register_methods()
    method = merge_methods.get(method_name)
    return any(p.name == "lambda" for p in method.spec.parameters)


def _task_only(tasks: TaskSettings) -> Tuple[Tuple[str, object], ...]:
    return (
        ("--include-path", tasks.include_path),
        ("--limit", tasks.limit),
        ("--num-fewshot", tasks.num_fewshot is not None),
        ("--apply-chat-template", tasks.apply_chat_template),
        ("--gen-kwargs", tasks.gen_kwargs),
        ("--metric", tasks.metric),
    )


def plan_comparison(
    config_file: Union[str, RecipeFile],
    data: Sequence[str],
    sweeps: Sweeps,
    settings: CompareSettings,
    *,
    tasks: Optional[TaskSettings] = None,
    trust_remote_code: bool = False,
) -> Prepared:
    """Candidates built, models, tokenizers, data and tasks checked, documents tokenized."""
    tasks = tasks or TaskSettings()
    if not data and not tasks.names:
        raise ValueError(
            "give held-out text (--data FILE), a benchmark task (--task NAME), or both"
        )
    if not tasks.names:
        given = [name for name, value in _task_only(tasks) if value]
        if given:
            raise ValueError(f"{', '.join(given)} applies to --task, which is not given")
    check_distinct(data)
    granularities = parse_values("--granularity", sweeps.granularities, str)
    for value in granularities:
        if value not in NAN_GRANULARITIES:
            raise ValueError(
                f"--granularity: {value!r} is not one of {', '.join(NAN_GRANULARITIES)}"
            )
    recipe = _read(config_file).mapping()
    candidates = build_candidates(
        recipe,
        exponents=parse_values("--exponent", sweeps.exponents, float),
        lambdas=parse_values("--lambda", sweeps.lambdas, float),
        granularities=granularities,
        against=[
            (os.path.basename(other.path), other.mapping()) for other in map(_read, sweeps.against)
        ],
        inputs=sweeps.inputs,
        takes_lambda=_takes_lambda(str(recipe.get("merge_method"))),
    )
    prepared = prepare(candidates, data, settings, trust_remote_code=trust_remote_code)
    if tasks.names:
        prepared = replace(prepared, tasks=plan_tasks(tasks, seed=settings.seed))
    return prepared


def compare(
    prepared: Prepared,
    options: MergeOptions,
    settings: CompareSettings,
    outputs: CompareOutputs,
    *,
    echo: Callable[[str], None] = print,
) -> Summary:
    """Merge and evaluate every candidate, print the table and verdicts, write the outputs."""
    for note in prepared.candidates.skipped:
        echo(f"note: left out {note}")
    if prepared.candidates.dropped:
        echo(
            "note: the baseline drops the weight priors of "
            + ", ".join(prepared.candidates.dropped)
        )
    scores = run_compare(prepared, options, settings, echo=echo)
    summary = summarize(prepared, scores.losses, seed=settings.seed, resamples=settings.resamples)
    summary = with_tasks(summary, scores.tasks)
    files: Dict[str, Callable[[str], None]] = {}
    if outputs.json_file:
        files[outputs.json_file] = lambda path: compare_report.write_json(path, summary)
    if outputs.csv_file:
        files[outputs.csv_file] = lambda path: compare_report.write_csv(path, summary)
    if outputs.plot_file:
        files[outputs.plot_file] = lambda path: compare_report.write_plot(path, summary)
    write_files(files)
    echo("")
    echo(compare_report.format_table(summary))
    echo("")
    for line in compare_report.verdict_lines(summary):
        echo(line)
    if outputs.keep:
        winner = summary.candidates[summary.winner]
        echo(f"Writing the winner, {winner.label}, to {outputs.keep}")
        merge_candidate(winner, outputs.keep, options, keep=True, overwrite=outputs.overwrite)
    for path in files:
        echo(f"Wrote {path}")
    if outputs.keep:
        echo(f"Wrote {Path(outputs.keep)}")
    return summary
