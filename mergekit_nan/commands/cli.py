"""``mergekit-nan``: check any recipe; inspect, plot and freeze NAN coefficients; merge; run the demo.

Errors end the command with one line on stderr and exit status 1, before any
output file is touched (``-v`` shows the traceback instead).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import click

__all__ = ["main"]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, IsADirectoryError)) and error.filename:
        text = f"{error.strerror or 'not found'}: {error.filename}"
    return text


def _reported(command: Callable) -> Callable:
    """Turn exceptions into ``Error: <one line>`` (tracebacks with ``-v``)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.Abort, click.exceptions.Exit, KeyboardInterrupt):
            raise
        except Exception as error:
            if kwargs.get("verbose"):
                raise
            raise click.ClickException(_one_line(error)) from None

    return run


def _granularity_option() -> Callable:
    return click.option(
        "--granularity",
        type=click.Choice(["tensor", "layer", "model"]),
        default=None,
        help="tensor: each tensor's own norms; layer: one coefficient per model per "
        "transformer layer; model: one per model from whole-checkpoint norms  "
        "[default: the recipe's nan_granularity, else tensor]",
    )


def _mergekit_options(command: Callable) -> Callable:
    """The mergekit options that matter for reading models and computing norms."""
    options = [
        _granularity_option(),
        click.option("--device", default=None, help="Compute on this device (e.g. cuda:0)"),
        click.option("--cuda", is_flag=True, help="Compute on the GPU (--device cuda)"),
        click.option(
            "--multi-gpu",
            is_flag=True,
            help="Spread the tensors over every GPU (mergekit's multi-GPU executor)",
        ),
        click.option("--lora-merge-cache", default=None, help="Where to store merged LoRA models"),
        click.option("--transformers-cache", default=None, help="Hugging Face cache directory"),
        click.option("--trust-remote-code", is_flag=True, help="Trust remote code (danger)"),
        click.option("--allow-crimes", is_flag=True, help="Allow mixing architectures"),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar"),
        click.option("--verbose", "-v", is_flag=True, help="Log details; show tracebacks"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _merge_options(arguments: Dict[str, Any]):
    from mergekit.options import MergeOptions

    logging.basicConfig(level=logging.INFO if arguments["verbose"] else logging.WARNING)
    return MergeOptions(
        device=arguments["device"],
        cuda=arguments["cuda"],
        multi_gpu=arguments["multi_gpu"],
        lora_merge_cache=arguments["lora_merge_cache"],
        transformers_cache=arguments["transformers_cache"],
        trust_remote_code=arguments["trust_remote_code"],
        allow_crimes=arguments["allow_crimes"],
        quiet=arguments["quiet"],
    )


def _check_writable(*paths: Optional[str]) -> None:
    for path in paths:
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no such directory for output {path}: {directory}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"output {path} is a directory")


def _preflight(
    config_file: str,
    arguments: Dict[str, Any],
    out_path: Optional[str] = None,
    ignore: Tuple[str, ...] = (),
) -> None:
    """Run ``check`` first: warnings go to stderr; the first error stops the command (exit 1).

    ``out_path`` is checked too (``output-overwrites-input``); findings whose
    code is in ``ignore`` are not shown.
    """
    from mergekit_nan.doctor.check import check_recipe

    report = check_recipe(config_file, out_path=out_path, options=_merge_options(arguments))
    report = dataclasses.replace(
        report, findings=tuple(f for f in report.findings if f.code not in ignore)
    )
    if report.errors:
        first = report.errors[0]
        text = first.line()[len("error: ") :]
        more = len(report.errors) - 1
        if more:
            text += f" (and {more} more: mergekit-nan check {config_file} lists them)"
        raise click.ClickException(text)
    for line in report.lines(levels=("warning",)):
        click.echo(line, err=True)


def _inspect(config_file: str, arguments: Dict[str, Any]):
    from mergekit_nan.commands.adapter_coefficients import adapter_inspection
    from mergekit_nan.commands.inspect import inspect_recipe, load_recipe
    from mergekit_nan.doctor.adapters import adapter_recipe
    from mergekit_nan.granularity import resolve_granularity

    _preflight(config_file, arguments)
    config = load_recipe(config_file)
    adapters = adapter_recipe(config)
    if adapters is not None:
        granularity = resolve_granularity(config, arguments["granularity"])
        return adapter_inspection(config, adapters, granularity)
    return inspect_recipe(
        config, granularity=arguments["granularity"], options=_merge_options(arguments)
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
@_mergekit_options
@_reported
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
    from mergekit_nan.commands import report
    from mergekit_nan.commands.premise import format_premise, premise, premise_findings
    from mergekit_nan.doctor.findings import format_findings

    _check_writable(json_file, csv_file, plot_file)
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
    report.write_files(outputs)
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
@_mergekit_options
@_reported
def freeze_command(config_file: str, output: str, **arguments: Any) -> None:
    """Write a stock mergekit recipe whose weights are CONFIG_FILE's NAN coefficients.

    The frozen recipe runs on plain mergekit (no plugin): per tensor weights
    through conditional filters at --granularity tensor and layer, one weight
    per model at --granularity model.
    """
    from mergekit_nan.commands.freeze import freeze_recipe, frozen_yaml
    from mergekit_nan.commands.report import write_files

    _check_writable(output)
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
@_reported
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

    from mergekit_nan.commands.report import write_files
    from mergekit_nan.doctor.check import check_recipe

    _check_writable(json_file)
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


@main.command("merge")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--save-frozen", default=None, help="Also write the frozen stock recipe (YAML) here")
@click.option("--random-seed", type=int, default=None, help="Seed for random methods (DARE, DELLA)")
@click.option(
    "--out-shard-size", default="5B", show_default=True, help="Parameters per output shard"
)
@click.option(
    "--lazy-unpickle/--no-lazy-unpickle",
    default=False,
    show_default=True,
    help="mergekit's experimental lazy unpickler (less memory)",
)
@click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    show_default=True,
    help="Copy a tokenizer to the output",
)
@click.option(
    "--write-model-card/--no-write-model-card",
    default=True,
    show_default=True,
    help="Write README.md naming NAN, the granularity and the coefficients",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a non-empty OUT_PATH (its content stays until the new model is complete)",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Adapter recipes: cut each merged LoRA module to this rank (QR and SVD of the "
    "factors) and report the fraction of its Frobenius norm kept",
)
@click.option(
    "--full-model",
    is_flag=True,
    help="Adapter recipes: write the full merged model (mergekit over BASE+ADAPTER "
    "models, any method) instead of one LoRA adapter",
)
@_mergekit_options
@_reported
def merge_command(
    config_file: str,
    out_path: str,
    save_frozen: Optional[str],
    random_seed: Optional[int],
    out_shard_size: str,
    lazy_unpickle: bool,
    copy_tokenizer: bool,
    write_model_card: bool,
    overwrite: bool,
    rank: Optional[int],
    full_model: bool,
    **arguments: Any,
) -> None:
    """Merge CONFIG_FILE into OUT_PATH with NAN coefficients at any granularity.

    --granularity tensor is mergekit-yaml CONFIG_FILE OUT_PATH, bit for bit.
    layer and model measure the norms in one streaming pass, freeze the
    coefficients into a stock recipe and merge it with mergekit. The model
    is written beside OUT_PATH and moved into place only when complete: an
    interrupted or failed merge leaves OUT_PATH as it was.
    """
    from mergekit.common import parse_kmb

    from mergekit_nan.commands.adapter_coefficients import base_adapter_config
    from mergekit_nan.commands.adapter_merge import adapter_merge_or_stock, merge_adapters
    from mergekit_nan.commands.inspect import load_recipe
    from mergekit_nan.commands.merge import merge_recipe
    from mergekit_nan.commands.output import OutputNotEmpty, leftovers
    from mergekit_nan.doctor.guard import suspended

    _check_writable(save_frozen)
    target = Path(os.path.realpath(os.path.expanduser(out_path)))
    for leftover in leftovers(target):
        click.echo(
            f"note: {leftover} was left by an interrupted merge into {out_path}; "
            "delete it once no merge into it is running",
            err=True,
        )
    _preflight(config_file, arguments, out_path=out_path, ignore=("output-not-empty",))
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputNotEmpty(
            f"output directory {out_path} is not empty; pass --overwrite to replace it "
            "(its content stays until the new model is complete)"
        )
    options = _merge_options(arguments).model_copy(
        update={
            "random_seed": random_seed,
            "out_shard_size": parse_kmb(out_shard_size),
            "lazy_unpickle": lazy_unpickle,
            "copy_tokenizer": copy_tokenizer,
            "write_model_card": write_model_card,
        }
    )
    source = Path(config_file).read_text(encoding="utf-8")
    try:
        with suspended():  # the preflight has reported every finding already
            config = load_recipe(config_file)
            adapters = adapter_merge_or_stock(config, rank=rank, full_model=full_model)
            if adapters is not None and not full_model:
                merged = merge_adapters(
                    config,
                    adapters,
                    out_path,
                    granularity=arguments["granularity"],
                    rank=rank,
                    config_source=source,
                    write_model_card=write_model_card,
                    overwrite=overwrite,
                    save_frozen=save_frozen,
                    source_name=os.path.basename(config_file),
                )
                for line in merged.lines():
                    click.echo(line)
                click.echo(
                    f"Merged {config_file} into {out_path} ({merged.granularity} granularity)"
                )
                return
            if adapters is not None:
                config = base_adapter_config(config, adapters)
                source = config.to_yaml() + "\n"
            result = merge_recipe(
                config,
                out_path,
                options,
                granularity=arguments["granularity"],
                config_source=source,
                save_frozen=save_frozen,
                source_name=os.path.basename(config_file),
                overwrite=overwrite,
            )
    except KeyboardInterrupt:
        click.echo(f"Interrupted: {out_path} was left as it was.", err=True)
        raise click.exceptions.Exit(130) from None
    except click.ClickException as error:
        raise click.ClickException(f"{error.message}; {out_path} was left as it was") from None
    except Exception as error:
        if arguments["verbose"]:
            raise
        raise click.ClickException(f"{_one_line(error)}; {out_path} was left as it was") from None
    if save_frozen:
        click.echo(f"Wrote {save_frozen}")
    click.echo(f"Merged {config_file} into {out_path} ({result.granularity} granularity)")


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep everything in this new or empty directory",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks")
@_reported
def demo_command(out: Optional[str], keep: bool, verbose: bool) -> None:
    """Merge three tiny fine-tunes with nan, offline, and show the coefficients used."""
    from mergekit_nan.commands.demo import run_demo

    run_demo(None if out is None else Path(out), keep=keep, echo=click.echo)
