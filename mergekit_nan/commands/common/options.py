"""The mergekit options of the ``mergekit-nan`` commands, and the ``MergeOptions`` they make.

:func:`mergekit_options` adds the options that matter for reading models and
computing norms (``inspect``, ``freeze``, ``merge``). :func:`writing_options`
adds, for ``merge``, every other option of the stock ``mergekit-yaml`` that
``mergekit-nan merge`` does not spell out itself, with mergekit's names,
flags and defaults, so a stock command line carries over word for word. :func:`merge_options` turns the parsed
arguments into ``MergeOptions``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

from mergekit_nan.parameters import NAN_GRANULARITIES

__all__ = [
    "STOCK_ONLY",
    "apply_options",
    "granularity_option",
    "merge_options",
    "mergekit_options",
    "reading_options",
    "writing_options",
]

_FLAGS: Dict[str, Tuple[bool, str]] = {
    # name: (mergekit's default, mergekit's help)
    "unsafe_truncate_embeddings": (
        False,
        "UNSAFE: discard trailing embedding rows to match the smallest vocabulary",
    ),
    "low_cpu_memory": (False, "Store results and intermediate values on the accelerator"),
    "clone_tensors": (False, "Clone tensors before saving (several uses of one layer)"),
    "safe_serialization": (True, "Save the output in safetensors"),
    "read_to_gpu": (False, "Read model weights directly to the accelerator"),
    "async_write": (False, "Write output shards asynchronously (more memory)"),
}
_VALUES: Dict[str, Tuple[Tuple[str, ...], type, Optional[Any], str]] = {
    # name: (declarations, type, mergekit's default, mergekit's help)
    "lora_merge_dtype": (("--lora-merge-dtype",), str, None, "Override dtype when applying LoRAs"),
    "num_threads": (("--num-threads", "-j"), int, None, "Threads for parallel CPU operations"),
    "write_threads": (("--write-threads",), int, 1, "Threads for asynchronous writes"),
}

STOCK_ONLY = (*_FLAGS, *_VALUES, "gpu_rich")
"""``MergeOptions`` fields that ``merge`` takes exactly as the stock ``mergekit-yaml`` does
(the same names, flags and defaults; ``tests/test_cli.py`` holds them to mergekit's)."""


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
    """The mergekit options for reading models and computing on a device, as click options.

    The help texts of the device options can be the command's own words.
    """
    return [
        click.option("--device", default=None, help=device),
        click.option("--cuda", is_flag=True, help=cuda),
        click.option("--multi-gpu", is_flag=True, help=multi_gpu),
        click.option("--lora-merge-cache", default=None, help="Where to store merged LoRA models"),
        click.option("--transformers-cache", default=None, help="Hugging Face cache directory"),
        click.option("--trust-remote-code", is_flag=True, help="Trust remote code (danger)"),
        click.option("--allow-crimes", is_flag=True, help="Allow mixing architectures"),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar"),
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


def writing_options(command: Callable) -> Callable:
    """Every :data:`STOCK_ONLY` option, as the stock ``mergekit-yaml`` spells it."""
    options = [
        click.option(
            f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",
            name,
            default=default,
            show_default=True,
            help=help_text,
        )
        for name, (default, help_text) in _FLAGS.items()
    ]
    options += [
        click.option(*declarations, name, type=kind, default=default, help=help_text)
        for name, (declarations, kind, default, help_text) in _VALUES.items()
    ]
    options.append(
        click.option(
            "--gpu-rich",
            "gpu_rich",
            is_flag=True,
            default=False,
            help="Alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu",
        )
    )
    return apply_options(command, options)


def merge_options(arguments: Dict[str, Any], **settings: Optional[Any]):
    """mergekit's ``MergeOptions`` from the parsed arguments, plus ``settings``.

    Fields of :data:`STOCK_ONLY` are taken from ``arguments`` where present.
    Logging goes to stderr at INFO with ``--verbose``, else WARNING.
    """
    from mergekit.options import MergeOptions

    logging.basicConfig(level=logging.INFO if arguments["verbose"] else logging.WARNING)
    stock = {name: arguments[name] for name in STOCK_ONLY if name in arguments}
    return MergeOptions(
        device=arguments["device"],
        cuda=arguments["cuda"],
        multi_gpu=arguments["multi_gpu"],
        lora_merge_cache=arguments["lora_merge_cache"],
        transformers_cache=arguments["transformers_cache"],
        trust_remote_code=arguments["trust_remote_code"],
        allow_crimes=arguments["allow_crimes"],
        quiet=arguments["quiet"],
        **stock,
        **settings,
    )
