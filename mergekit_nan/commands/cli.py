"""``mergekit-nan``: check any recipe; inspect, plot and freeze NAN coefficients; merge; run the demo.

Errors end the command with one line on stderr and exit status 1, before any
output file is touched (``-v`` shows the traceback instead).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import click

from mergekit_nan.commands.common.messages import reported
from mergekit_nan.commands.common.options import merge_options, mergekit_options
from mergekit_nan.commands.common.preflight import check_writable, preflight
from mergekit_nan.commands.compare.options import compare_options
from mergekit_nan.commands.merge.command import merge_command

__all__ = ["main"]


def _inspect(config_file: str, arguments: Dict[str, Any]):
    from mergekit_nan.commands.adapters.coefficients import adapter_inspection
    from mergekit_nan.commands.inspection.coefficient_pass import inspect_recipe
    from mergekit_nan.doctor.adapters import adapter_recipe
    from mergekit_nan.granularity import resolve_granularity

    config = preflight(config_file, arguments).config()
    adapters = adapter_recipe(config)
    if adapters is not None:
        granularity = resolve_granularity(config, arguments["granularity"])
        return adapter_inspection(config, adapters, granularity)
    return inspect_recipe(
        config, granularity=arguments["granularity"], options=merge_options(arguments)
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-nan", prog_name="mergekit-nan")
def main() -> None:
    """NAN merge coefficients (arXiv 2505.16148): check a recipe, see, plot and freeze
    the coefficients, or merge at tensor, layer or model granularity."""


@main.command("inspect")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--all", "all_tensors", is_flag=True, help="One row per tensor, not per layer")
@click.option("--json", "json_file", default=None, help="Write every coefficient to this JSON file")
@click.option("--csv", "csv_file", default=None, help="Write every coefficient to this CSV file")
@click.option("--plot", "plot_file", default=None, help="Write a heatmap PNG (needs matplotlib)")
@mergekit_options
@reported
def inspect_command(
    config_file: str,
    all_tensors: bool,
    json_file: Optional[str],
    csv_file: Optional[str],
    plot_file: Optional[str],
    **arguments: Any,
) -> None:
    """Show the NAN coefficients the merge of CONFIG_FILE would use, without merging.

    Reads one tensor per input model at a time. For nan the table shows
    alpha_i (lambda scales the merged task vector); for <method>+nan the
    weight values handed to <method>.
    """
    from mergekit_nan.commands.common.output import write_files
    from mergekit_nan.commands.inspection import report
    from mergekit_nan.commands.inspection.premise import format_premise, premise, premise_findings
    from mergekit_nan.doctor.findings import format_findings

    check_writable(json_file, csv_file, plot_file)
    if plot_file:
        report.require_matplotlib()
    inspection = _inspect(config_file, arguments)
    outputs: Dict[str, Callable[[str], None]] = {}
    if json_file:
        outputs[json_file] = lambda path: report.write_json(path, inspection)
    if csv_file:
        outputs[csv_file] = lambda path: report.write_csv(path, inspection)
    if plot_file:
        outputs[plot_file] = lambda path: report.write_heatmap(path, inspection)
    write_files(outputs)
    click.echo(report.format_table(inspection, all_tensors=all_tensors))
    labels = report.model_labels(inspection.models)
    found = premise(inspection)
    click.echo("")
    click.echo(format_premise(found, labels))
    for line in format_findings(premise_findings(found, labels)):
        click.echo(line)
    for path in outputs:
        click.echo(f"Wrote {path}")


@main.command("freeze")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, help="Where to write the stock recipe (YAML)")
@mergekit_options
@reported
def freeze_command(config_file: str, output: str, **arguments: Any) -> None:
    """Write a stock mergekit recipe whose weights are CONFIG_FILE's NAN coefficients.

    The frozen recipe runs on plain mergekit (no plugin): per tensor weights
    through conditional filters at --granularity tensor and layer, one weight
    per model at --granularity model.
    """
    from mergekit_nan.commands.common.output import write_files
    from mergekit_nan.commands.inspection.freeze import freeze_recipe, frozen_yaml

    check_writable(output)
    inspection = _inspect(config_file, arguments)
    frozen = freeze_recipe(inspection)
    text = frozen_yaml(frozen, source=os.path.basename(config_file), inspection=inspection)
    write_files({output: lambda path: Path(path).write_text(text, encoding="utf-8")})
    click.echo(
        f"Wrote {output}: merge_method {inspection.inner_method}, "
        f"{len(inspection.models)} models, {len(inspection.tensors)} tensors "
        f"({inspection.granularity} granularity)"
    )
    click.echo(f"Run it with stock mergekit: mergekit-yaml {output} OUTPUT_DIR")


@main.command("check")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit with status 1 on warnings too")
@click.option("--json", "json_file", default=None, help="Write every finding and the estimate here")
@click.option(
    "--out-path",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the merge will write: check it is no input, is empty and has room",
)
@click.option("--transformers-cache", default=None, help="Hugging Face cache directory")
@click.option("--trust-remote-code", is_flag=True, help="Trust remote code (danger)")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks")
@reported
def check_command(
    config_file: str,
    strict: bool,
    json_file: Optional[str],
    out_path: Optional[str],
    transformers_cache: Optional[str],
    trust_remote_code: bool,
    verbose: bool,
) -> None:
    """Check any mergekit recipe (NAN or not) without reading tensor data.

    Finds missing models, architecture, shape, vocabulary and dtype
    mismatches, parameter mistakes and what mergekit's planner rejects, and
    estimates the job (bytes read and written, peak memory, free disk at
    --out-path). Exit status 1 on errors (with --strict, on warnings too).
    """
    import json

    from mergekit.options import MergeOptions

    from mergekit_nan.commands.common.output import write_files
    from mergekit_nan.doctor.check import check_recipe

    check_writable(json_file)
    options = MergeOptions(
        transformers_cache=transformers_cache, trust_remote_code=trust_remote_code
    )
    report = check_recipe(config_file, out_path=out_path, options=options)
    if json_file:
        text = json.dumps(report.to_json(), indent=2)
        write_files({json_file: lambda path: Path(path).write_text(text, encoding="utf-8")})
    click.echo(report.render())
    if json_file:
        click.echo(f"Wrote {json_file}")
    code = report.exit_code(strict=strict)
    if code:
        raise SystemExit(code)


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep everything in this new or empty directory",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks")
@reported
def demo_command(out: Optional[str], keep: bool, verbose: bool) -> None:
    """Merge three tiny fine-tunes with nan, offline, and show the coefficients used."""
    from mergekit_nan.commands.demo import run_demo

    run_demo(None if out is None else Path(out), keep=keep, echo=click.echo)


@main.command("compare")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@compare_options
@reported
def compare_command(config_file: str, **arguments: Any) -> None:
    """Does NAN help? Merge CONFIG_FILE and its baseline without NAN (and any sweeps),
    score each on held-out --data and on lm-eval --task benchmarks, and say which is
    better, with bootstrap intervals.

    Each candidate is merged once by mergekit, evaluated in batches and deleted
    (one merged model on disk at a time); nothing is merged before every model,
    tokenizer and data file has been checked.
    """
    from mergekit_nan.commands.common.output import OutputNotEmpty
    from mergekit_nan.commands.compare.run import CompareOutputs, Sweeps, compare, plan_comparison
    from mergekit_nan.commands.compare.settings import CompareSettings
    from mergekit_nan.commands.compare.tasks import TaskSettings
    from mergekit_nan.commands.inspection import report

    a = arguments
    keep = a["keep"]
    check_writable(a["json_file"], a["csv_file"], a["plot_file"])
    if a["plot_file"]:
        report.require_matplotlib()
    recipe = preflight(config_file, a, out_path=keep, ignore=("output-not-empty",))
    against = [preflight(other, a) for other in a["against"]]
    if keep and os.path.isdir(keep) and any(os.scandir(keep)) and not a["overwrite"]:
        raise OutputNotEmpty(
            f"--keep directory {keep} is not empty; pass --overwrite to replace it"
        )
    settings = CompareSettings(
        a["max_length"], a["max_documents"], a["batch_tokens"], a["seed"], a["bootstrap"],
        a["work_dir"],
    )  # fmt: skip
    sweeps = Sweeps(a["exponent"], a["lambdas"], a["granularity"], against, a["inputs"])
    tasks = TaskSettings(
        a["tasks"], a["include_path"], a["limit"], a["num_fewshot"], a["apply_chat_template"],
        a["gen_kwargs"], a["metric"], a["task_batch_size"],
    )  # fmt: skip
    prepared = plan_comparison(
        recipe, a["data"], sweeps, settings, tasks=tasks,
        trust_remote_code=a["trust_remote_code"],
    )  # fmt: skip
    options = merge_options(a)
    outputs = CompareOutputs(a["json_file"], a["csv_file"], a["plot_file"], keep, a["overwrite"])
    try:
        compare(prepared, options, settings, outputs, echo=click.echo)
    except KeyboardInterrupt:
        click.echo("Interrupted: no merged model and no output file was left.", err=True)
        raise click.exceptions.Exit(130) from None


main.add_command(merge_command)
