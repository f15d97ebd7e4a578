"""The mergekit options of the ``mergekit-nan`` commands, and the ``MergeOptions`` they make.

Every option that stands for a field of mergekit's ``MergeOptions`` is built
from the field itself (``MergeOptions.model_fields``: name, type, default) and
mergekit's own help text (``mergekit.options.OPTION_HELP``), spelled as the
stock ``mergekit-yaml`` spells it (``add_merge_options``), so a field that
mergekit adds appears here without a line of ours. What stays ours is listed
below: the fields that every command reads (:data:`READING`), their plain
``--flag`` spelling (:data:`SWITCHES`) and ``-v/--verbose`` instead of
mergekit's ``verbosity``; help texts of our own are passed where a command
gives a field a meaning of its own (the device options, the model card).

:func:`reading_options` gives the options that matter for reading models and
computing norms (``inspect``, ``freeze``, ``merge``, ``compare``);
:func:`writing_options` every other field, for ``merge``; :func:`merge_options`
turns the parsed arguments into ``MergeOptions``.
"""

from __future__ import annotations

import logging
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence

import click
import mergekit.options as stock

from mergekit_nan.parameters import NAN_GRANULARITIES

__all__ = [
    "READING",
    "SWITCHES",
    "apply_options",
    "granularity_option",
    "merge_options",
    "mergekit_option",
    "mergekit_options",
    "reading_options",
    "writing_options",
]

READING = (
    "device",
    "cuda",
    "multi_gpu",
    "lora_merge_cache",
    "transformers_cache",
    "trust_remote_code",
    "allow_crimes",
    "quiet",
)
"""The ``MergeOptions`` fields that every command reads models and computes with."""

SWITCHES = ("cuda", "multi_gpu", "trust_remote_code", "allow_crimes", "quiet")
"""Fields spelled ``--name`` alone (no ``--no-name``), as ``mergekit-nan`` always has."""

_SHORT = {"quiet": ("-q",), "num_threads": ("-j",)}
_NOT_MIRRORED = ("verbosity",)  # ``-v/--verbose`` is ours: INFO logging and tracebacks


class _ShardSize(stock.ShardSizeParamType):
    """mergekit's ``--out-shard-size`` type (5B, 500M, 20K), refusing a bad size in one line."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]):
        try:
            return super().convert(value, param, ctx)
        except (ValueError, IndexError):
            self.fail(f"{value!r} is not a number of parameters (such as 5B, 500M or 20K)")


def mergekit_option(name: str, help: Optional[str] = None) -> Callable:
    """The click option for the ``MergeOptions`` field ``name``, as ``mergekit-yaml`` has it.

    The declarations, type and default are the field's, the help mergekit's
    (or ``help``); fields in :data:`SWITCHES` are spelled ``--name`` alone.
    """
    field = stock.MergeOptions.model_fields[name]
    kind = field.annotation
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    flag = f"--{name.replace('_', '-')}"
    declarations = [flag, *_SHORT.get(name, ())]
    settings: Dict[str, Any] = {
        "default": field.default,
        "help": help or stock.OPTION_HELP.get(name),
        "show_default": name != "out_shard_size",  # mergekit's help names its default
    }
    if name == "gpu_rich" or name in SWITCHES:
        settings["is_flag"] = True
    elif kind is bool:
        declarations[0] = f"{flag}/--no-{flag[2:]}"
    else:
        settings["type"] = _ShardSize() if name == "out_shard_size" else kind
    return click.option(*declarations, name, **settings)


def granularity_option() -> Callable:
    return click.option(
        "--granularity",
        type=click.Choice(NAN_GRANULARITIES),
        default=None,
        help="tensor: each tensor's own norms; layer: one coefficient per model per "
        "transformer layer; model: one per model from whole-checkpoint norms  "
        "[default: the recipe's nan_granularity, else tensor; NAN recipes only]",
    )


def reading_options(
    device: str = "Compute on this device (e.g. cuda:0)",
    cuda: str = "Compute on the GPU (--device cuda)",
    multi_gpu: str = "Spread the tensors over every GPU (mergekit's multi-GPU executor)",
) -> List[Callable]:
    """The :data:`READING` options and ``-v/--verbose``, as click options.

    The help texts of the device options are the command's own words.
    """
    own = {"device": device, "cuda": cuda, "multi_gpu": multi_gpu}
    return [
        *(mergekit_option(name, own.get(name)) for name in READING),
        click.option("--verbose", "-v", is_flag=True, help="Log details; show tracebacks"),
    ]


def apply_options(command: Callable, options: Sequence[Callable]) -> Callable:
    """``command`` with ``options`` applied, the first listed first in ``--help``."""
    for option in reversed(options):
        command = option(command)
    return command


def mergekit_options(command: Callable) -> Callable:
    """The mergekit options that matter for reading models and computing norms."""
    return apply_options(command, [granularity_option(), *reading_options()])


def writing_options(**help_texts: str) -> Callable[[Callable], Callable]:
    """Every other ``MergeOptions`` field as an option, in mergekit's order.

    ``help_texts`` replace mergekit's for the fields they name.
    """
    names = [
        name
        for name in stock.MergeOptions.model_fields
        if name not in READING and name not in _NOT_MIRRORED
    ]
    options = [mergekit_option(name, help_texts.get(name)) for name in names]
    return lambda command: apply_options(command, options)


def merge_options(arguments: Dict[str, Any], **settings: Optional[Any]):
    """mergekit's ``MergeOptions`` from the parsed arguments, plus ``settings``.

    Every field that is an argument is taken, as ``add_merge_options`` does.
    Logging goes to stderr at INFO with ``--verbose``, else WARNING.
    """
    logging.basicConfig(level=logging.INFO if arguments["verbose"] else logging.WARNING)
    fields = stock.MergeOptions.model_fields
    given = {name: value for name, value in arguments.items() if name in fields}
    return stock.MergeOptions(**given, **settings)
