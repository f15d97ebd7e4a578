"""The model card of ``mergekit-nan merge``: mergekit's card plus what NAN did.

mergekit's own card (:func:`mergekit.card.generate_card`) for the recipe as
given names the method and the models; :func:`nan_card_section` adds the
granularity, the coefficients and the command that reproduces the model.
``mergekit_config.yml`` holds the recipe as given and, when the coefficients
were frozen, :data:`FROZEN_FILE` the stock recipe that was merged. A recipe
without NAN gets mergekit's card and a section naming the command that made
it (:func:`stock_card_files`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Dict, List, Optional

from mergekit.card import generate_card
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_nan.commands.inspection.coefficient_pass import Inspection
from mergekit_nan.commands.inspection.premise import Premise, card_line
from mergekit_nan.commands.inspection.report import format_table, model_labels
from mergekit_nan.method import NAN_PAPER_URL
from mergekit_nan.parameters import Granularity

__all__ = [
    "FROZEN_FILE",
    "card_files",
    "nan_card_section",
    "reproduce_command",
    "stock_card_files",
    "write_card_files",
]

FROZEN_FILE = "mergekit_nan_frozen.yml"
"""The stock recipe merged at ``layer``/``model`` granularity, next to the card."""

_POOLING = {
    "tensor": "every tensor's coefficients come from its own norms ||x_i,t||, "
    "computed inside the merge",
    "layer": "one coefficient per model per transformer layer, from the layer's "
    "pooled norms sqrt(sum_t ||x_i,t||^2); embeddings, final norm and lm_head keep "
    "per-tensor coefficients",
    "model": "one coefficient per model, from whole-model norms sqrt(sum_t ||x_i,t||^2)",
}


def reproduce_command(granularity: Optional[Granularity], options: MergeOptions) -> str:
    """The ``mergekit-nan merge`` command line that writes this model again.

    Names every option that changes what is written: the granularity (None
    for a recipe without NAN), the random seed (DARE, DELLA), the device, the
    output shard size and the switches mergekit needs for the recipe;
    ``OUT_PATH`` is left to the reader.
    """
    words: List[str] = ["mergekit-nan", "merge", "mergekit_config.yml", "OUT_PATH"]
    if granularity is not None:
        words += ["--granularity", granularity]
    if options.random_seed is not None:
        words += ["--random-seed", str(options.random_seed)]
    if options.device not in (None, "cpu"):
        words += ["--device", str(options.device)]
    if options.multi_gpu:
        words.append("--multi-gpu")
    if options.out_shard_size != parse_kmb("5B"):
        words += ["--out-shard-size", str(options.out_shard_size)]
    flags = {
        "--allow-crimes": options.allow_crimes,
        "--trust-remote-code": options.trust_remote_code,
        "--lazy-unpickle": options.lazy_unpickle,
        "--no-copy-tokenizer": not options.copy_tokenizer,
        "--clone-tensors": options.clone_tensors,
        "--no-safe-serialization": not options.safe_serialization,
        "--unsafe-truncate-embeddings": options.unsafe_truncate_embeddings,
    }
    if options.lora_merge_dtype is not None:
        words += ["--lora-merge-dtype", options.lora_merge_dtype]
    words += [flag for flag, given in flags.items() if given]
    return shlex.join(words)


def nan_card_section(
    config: MergeConfiguration,
    granularity: Granularity,
    inspection: Optional[Inspection],
    command: Optional[str] = None,
    norms: Optional[str] = None,
) -> str:
    """Markdown for the model card: NAN, the granularity, the norms and the coefficients.

    ``norms`` is :func:`~mergekit_nan.commands.inspection.premise.card_line`'s one line.
    """
    lines = [
        "",
        "### NAN coefficients",
        "",
        f"The merge coefficients were estimated with [NAN]({NAN_PAPER_URL}) "
        f"(`merge_method: {config.merge_method}`) by `mergekit-nan merge` at "
        f"**{granularity}** granularity: {_POOLING[granularity]}.",
        "",
    ]
    if norms:
        lines += [norms, ""]
    if inspection is not None:
        lines += ["```text", format_table(inspection), "```", ""]
    else:
        lines += [
            "`mergekit-nan inspect mergekit_config.yml --all` lists them per tensor.",
            "",
        ]
    lines.append(
        "`mergekit_config.yml` is the recipe as given; `mergekit-nan merge` reproduces "
        "this model from it" + (f":\n\n```bash\n{command}\n```" if command else ".")
    )
    if inspection is not None and granularity != "tensor":
        lines.append(
            f"\n`{FROZEN_FILE}` is the stock mergekit recipe that was merged "
            f"(`{inspection.inner_method}` with these coefficients as `weight` values); "
            "plain `mergekit-yaml` reproduces this model from it."
        )
    return "\n".join(lines) + "\n"


def card_files(
    name: str,
    config: MergeConfiguration,
    source: str,
    granularity: Granularity,
    inspection: Optional[Inspection],
    frozen: Optional[str],
    options: MergeOptions,
    found: Optional[Premise] = None,
) -> Dict[str, str]:
    """File name -> text of the card files for a model named ``name``.

    ``found`` (the models as NAN saw them) gives the card its line of norms.
    """
    card = generate_card(config=config, config_yaml=source, name=name)
    command = reproduce_command(granularity, options)
    norms = None
    if found is not None and found.models:
        norms = card_line(found, model_labels([m.model for m in found.models]))
    section = nan_card_section(config, granularity, inspection, command, norms)
    files = {
        "README.md": card + section,
        "mergekit_config.yml": source,
    }
    if frozen is not None and granularity != "tensor":
        files[FROZEN_FILE] = frozen
    return files


def stock_card_files(
    name: str, config: MergeConfiguration, source: str, options: MergeOptions
) -> Dict[str, str]:
    """File name -> text of the card files for a recipe without NAN, merged by ``merge``.

    mergekit's own card, and a section that says which command made the model
    and how to make it again.
    """
    card = generate_card(config=config, config_yaml=source, name=name)
    section = "\n".join(
        [
            "",
            "### Merged with mergekit-nan merge",
            "",
            f"This model was merged by `mergekit-nan merge` with mergekit's own "
            f"`{config.merge_method}` (no NAN coefficients): the recipe was checked before "
            "any tensor was read, no input could be overwritten, and the model was written "
            "beside its directory and moved into place once complete. The tensors are those "
            "the stock `mergekit-yaml` writes with the same options. `mergekit_config.yml` "
            "is the recipe as given; this command writes the model again:",
            "",
            "```bash",
            reproduce_command(None, options),
            "```",
            "",
        ]
    )
    return {"README.md": card + section, "mergekit_config.yml": source}


def write_card_files(directory: Path, files: Dict[str, str]) -> None:
    for file_name, text in files.items():
        (directory / file_name).write_text(text, encoding="utf-8")
