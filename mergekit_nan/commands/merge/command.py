"""``mergekit-nan merge``: any recipe, checked first, never over an input, written atomically.

The click command; :mod:`mergekit_nan.commands.merge.run` merges full models,
:mod:`mergekit_nan.commands.adapters.merge` adapter recipes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import click

from mergekit_nan.commands.common.messages import one_line, reported
from mergekit_nan.commands.common.options import merge_options, mergekit_options, writing_options
from mergekit_nan.commands.common.preflight import check_writable, preflight

__all__ = ["merge_command"]


@click.command("merge")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--save-frozen", default=None, help="Also write the frozen stock recipe (YAML) here")
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
@writing_options(
    write_model_card="Write README.md naming NAN, the granularity and the coefficients"
)
@mergekit_options
@reported
def merge_command(
    config_file: str,
    out_path: str,
    save_frozen: Optional[str],
    overwrite: bool,
    rank: Optional[int],
    full_model: bool,
    **arguments: Any,
) -> None:
    """Merge any mergekit recipe CONFIG_FILE into OUT_PATH: checked, inputs safe, atomic.

    Every check error stops the merge before anything is read or written, an
    OUT_PATH that is or holds an input is refused, and the model is written
    beside OUT_PATH and moved into place only when complete: an interrupted
    or failed merge leaves OUT_PATH as it was. A recipe without NAN gives the
    tensors of mergekit-yaml CONFIG_FILE OUT_PATH with the same options, bit
    for bit. A NAN recipe at --granularity tensor is mergekit-yaml, bit for
    bit; layer and model measure the norms in one streaming pass, freeze the
    coefficients into a stock recipe and merge it with mergekit.
    """
    from mergekit_nan.commands.adapters.coefficients import base_adapter_config
    from mergekit_nan.commands.adapters.merge import adapter_merge_or_stock, merge_adapters
    from mergekit_nan.commands.common.interrupts import Terminated, stopped_by_signals
    from mergekit_nan.commands.common.output import OutputNotEmpty, leftovers
    from mergekit_nan.commands.merge.run import merge_recipe
    from mergekit_nan.doctor.guard import suspended

    check_writable(save_frozen)
    target = Path(os.path.realpath(os.path.expanduser(out_path)))
    for leftover in leftovers(target):
        click.echo(
            f"note: {leftover} was left by an interrupted merge into {out_path}; "
            "delete it once no merge into it is running",
            err=True,
        )
    recipe = preflight(
        config_file, arguments, out_path=out_path, ignore=("output-not-empty",), single=True
    )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputNotEmpty(
            f"output directory {out_path} is not empty; pass --overwrite to replace it "
            "(its content stays until the new model is complete)"
        )
    options = merge_options(arguments)
    if options.num_threads is not None:  # as the stock mergekit-yaml sets them
        options.apply_global_options()
    source = recipe.text
    try:
        # The preflight has reported every finding already; SIGTERM unwinds like Ctrl-C.
        with suspended(), stopped_by_signals():
            config = recipe.config()
            adapters = adapter_merge_or_stock(config, rank=rank, full_model=full_model)
            if adapters is not None and not full_model:
                merged = merge_adapters(
                    config,
                    adapters,
                    out_path,
                    granularity=arguments["granularity"],
                    rank=rank,
                    config_source=source,
                    write_model_card=options.write_model_card,
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
    except Terminated:
        click.echo(f"Terminated: {out_path} was left as it was.", err=True)
        raise click.exceptions.Exit(Terminated.exit_status) from None
    except click.ClickException as error:
        raise click.ClickException(f"{error.message}; {out_path} was left as it was") from None
    except Exception as error:
        if arguments["verbose"]:
            raise
        raise click.ClickException(f"{one_line(error)}; {out_path} was left as it was") from None
    if save_frozen:
        click.echo(f"Wrote {save_frozen}")
    how = "" if result.granularity is None else f" ({result.granularity} granularity)"
    click.echo(f"Merged {config_file} into {out_path}{how}")
