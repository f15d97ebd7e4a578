"""Where a merge writes, against what it reads: ``output-overwrites-input``, ``output-not-empty``.

mergekit writes its output files straight into the output directory, and
``mergekit-nan merge --overwrite`` replaces that directory whole, so an output
directory that is, lies inside, or contains the directory of an input would
destroy that input. The inputs are every model a recipe names (base model,
models, slice sources, LoRA adapters, the tokenizer source) in every
document of a ``mergekit-multi`` file, and the output directories of the
other stages; each is compared as its real path (``~`` expanded, symlinks
resolved). A Hugging Face model counts as its whole cache folder
(``models--org--name``: snapshots and the blobs they link to).

Nothing here reads more than directory entries.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.model_files import model_places
from mergekit_nan.recipe import looks_like_repo

__all__ = ["MODEL_FILES", "input_directories", "output_findings", "overlap", "real_path"]

MODEL_FILES = ("config.json", ".safetensors", ".bin", ".index.json")
"""Names (or endings) of the files that make a directory hold a model."""


def real_path(path: str) -> str:
    """``path`` with ``~`` expanded and symlinks resolved (as far as it exists)."""
    return os.path.realpath(os.path.expanduser(path))


def overlap(output: str, directory: str) -> Optional[str]:
    """How the real paths ``output`` and ``directory`` overlap, in words; None if they do not."""
    if output == directory:
        return "is"
    if os.path.commonpath([output, directory]) == directory:
        return "lies inside"
    if os.path.commonpath([output, directory]) == output:
        return "contains"
    return None


def _hub_folder(repository: str, cache_dir: Optional[str]) -> Optional[str]:
    from huggingface_hub import constants

    folder = os.path.join(
        cache_dir or constants.HF_HUB_CACHE, "models--" + repository.replace("/", "--")
    )
    return real_path(folder) if os.path.isdir(folder) else None


def _directory(path: str, cache_dir: Optional[str]) -> Optional[str]:
    """The directory a model path reads from: a local one, else its Hugging Face cache folder."""
    local = os.path.expanduser(path)
    if os.path.exists(local):
        return real_path(local if os.path.isdir(local) else os.path.dirname(local) or ".")
    if looks_like_repo(path):
        return _hub_folder(path, cache_dir)
    return None


def input_directories(
    documents: Sequence[Mapping[str, Any]], *, cache_dir: Optional[str] = None
) -> List[Tuple[str, str, str]]:
    """``(where, label, real directory)`` of every input found on disk, in recipe order.

    ``where`` is prefixed with the stage (``name:``) for multi-document recipes;
    references to another stage's name are left out (see ``stage_outputs``).
    """
    multi = len(documents) > 1
    stages = {str(d["name"]) for d in documents if multi and d.get("name") is not None}
    found = []
    for document in documents:
        prefix = f"{document.get('name') or 'final'}:" if multi else ""
        for reference, (label, places, _) in model_places(document).items():
            if reference.model.path in stages:
                continue
            parts = [(reference.model.path, label)]
            if reference.lora is not None:
                parts.append((reference.lora.path, f"{label} (its LoRA adapter)"))
            for path, name in parts:
                directory = _directory(path, cache_dir)
                if directory is not None:
                    found.append((prefix + places[0], name, directory))
    return found


def _contents(directory: str) -> List[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def output_findings(
    documents: Sequence[Mapping[str, Any]],
    out_path: str,
    *,
    cache_dir: Optional[str] = None,
    stage_outputs: Iterable[Tuple[str, str]] = (),
) -> List[Finding]:
    """Findings about ``out_path`` (the final output) for a recipe's documents.

    ``stage_outputs`` are ``(stage, directory)`` of other outputs the same run
    writes (``mergekit-multi``'s intermediate merges): ``out_path`` must not
    overlap them either.
    """
    output = real_path(out_path)
    findings = []
    for where, label, directory in input_directories(documents, cache_dir=cache_dir):
        relation = overlap(output, directory)
        if relation is None:
            continue
        shown = "" if real_path(label) == directory else f" ({directory})"
        findings.append(
            Finding(
                "error",
                "output-overwrites-input",
                where,
                f"the output directory {out_path} {relation} the directory of input model "
                f"{label}{shown}: writing the merge there would overwrite or delete that input",
                "choose an output directory outside every input model, e.g. a new ./merged",
            )
        )
    for stage, directory in stage_outputs:
        relation = overlap(output, real_path(directory))
        if relation is not None:
            findings.append(
                Finding(
                    "error",
                    "output-overwrites-input",
                    stage,
                    f"the output directory {out_path} {relation} the output of stage "
                    f"{stage} ({directory}), which a later stage reads",
                    "choose an output directory outside the intermediate directory",
                )
            )
    held = _contents(output) if os.path.isdir(output) else []
    if held and not findings:
        models = [name for name in held if name.endswith(MODEL_FILES)]
        shown = ", ".join((models or held)[:3]) + (" ..." if len(models or held) > 3 else "")
        what = "a model" if models else f"{len(held)} entries"
        findings.append(
            Finding(
                "warning",
                "output-not-empty",
                "",
                f"the output directory {out_path} already holds {what} ({shown}): mergekit "
                "writes into it, mixing the new files with the old ones",
                "merge into a new or empty directory; `mergekit-nan merge --overwrite` "
                "replaces it whole, once the new model is complete",
            )
        )
    return findings
