"""``mergekit-nan compare``: does NAN, or this recipe, help on the user's own held-out text?

Order of work, so that every mistake is found before the first merge:

1. :func:`prepare` builds the candidates
   (:mod:`~mergekit_nan.commands.compare_candidates`), checks that every model
   is a causal language model, loads the tokenizer the merge would copy
   (``tokenizer_source`` naming a model, else the base, else the first model)
   and refuses models whose tokenizers differ, reads every data file
   (:mod:`mergekit_nan.doctor.heldout`) and tokenizes its documents:
   ``tokenizer(text)`` with its default special tokens (a chat ``messages``
   record: the chat template's text, which carries its own special tokens),
   cut to ``max_length``; documents of fewer than 2 tokens are skipped and
   counted.
2. :func:`run_compare` merges each candidate once through mergekit's own
   executor (``run_merge``; :func:`~mergekit_nan.commands.merge.merge_recipe`
   for NAN recipes, which measures layer and model granularity in its streaming
   pass) into a temporary directory, loads it with ``transformers``
   (``device_map`` on accelerators, so a model larger than one device is
   spread), evaluates every file in batches and deletes it before the next
   merge: at most one merged model is on disk at a time, and an error or Ctrl-C
   leaves none. Input models (``--inputs``) are evaluated where they are.
3. The statistics (:mod:`mergekit_nan.evaluation`): per file and overall
   (every file's documents pooled), nats per token, a seeded bootstrap 95 %
   interval over documents, and each candidate's paired bootstrap difference
   from the baseline. With more than two merged candidates the best is picked
   on one seeded half of each file's documents and its difference from the
   baseline measured on the other half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_nan.commands.compare_candidates import Candidate, CandidateSet
from mergekit_nan.doctor.heldout import DataError, Document, load_documents
from mergekit_nan.evaluation import DocumentLosses, document_losses

__all__ = [
    "CompareSettings",
    "HeldOutFile",
    "Prepared",
    "evaluate_model",
    "merge_candidate",
    "prepare",
    "run_compare",
    "tokenizer_source",
]


@dataclass(frozen=True)
class CompareSettings:
    """How documents are cut, batched and resampled (the command's options)."""

    max_length: int = 1024
    max_documents: Optional[int] = None
    batch_tokens: int = 1024
    seed: int = 0
    resamples: int = 1000
    work_dir: Optional[str] = None


@dataclass(frozen=True)
class HeldOutFile:
    """One data file, tokenized: ``name`` as given on the command line."""

    name: str
    token_ids: Tuple[Tuple[int, ...], ...]
    skipped: int

    @property
    def tokens(self) -> int:
        """Predicted tokens: n - 1 per document."""
        return sum(len(ids) - 1 for ids in self.token_ids)


@dataclass(frozen=True)
class Prepared:
    """Everything checked and tokenized, ready to merge and evaluate."""

    candidates: CandidateSet
    files: Tuple[HeldOutFile, ...]
    tokenizer_model: str


def _config(recipe: Mapping[str, Any]) -> MergeConfiguration:
    return MergeConfiguration.model_validate(recipe)


def _model_paths(candidates: CandidateSet) -> List[str]:
    """Every model directory the candidates read (a LoRA reference: its base model)."""
    paths: List[str] = []
    for candidate in candidates.candidates:
        if candidate.recipe is None:
            found = [str(candidate.model)]
        else:
            found = [m.model.path for m in _config(candidate.recipe).referenced_models()]
        paths.extend(path for path in found if path not in paths)
    return paths


def tokenizer_source(recipe: Mapping[str, Any]) -> str:
    """The model whose tokenizer the merge of ``recipe`` would copy."""
    config = _config(recipe)
    source = config.tokenizer_source
    if source is None and config.tokenizer is not None:
        source = config.tokenizer.source
    if isinstance(source, str) and source not in ("base", "union"):
        return source
    if hasattr(source, "model") and getattr(source, "model", None) is not None:
        return source.model.path
    if config.base_model is not None:
        return config.base_model.model.path
    return config.referenced_models()[0].model.path


def _check_causal(paths: Sequence[str], trust_remote_code: bool) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for path in paths:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        names = list(config.architectures or ())
        known = (
            all(name in causal or name.endswith(("ForCausalLM", "LMHeadModel")) for name in names)
            if names
            else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        )
        if not known:
            shown = ", ".join(names) or config.model_type
            raise ValueError(
                f"model {path} is a {shown}, not a causal language model; compare evaluates "
                "causal LMs (AutoModelForCausalLM)"
            )


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _tokenizer(paths: Sequence[str], source: str, trust_remote_code: bool):
    tokenizer = _load_tokenizer(source, trust_remote_code)
    if tokenizer is None:
        raise ValueError(
            f"model {source} has no tokenizer: compare tokenizes --data with the tokenizer the "
            "merge would copy (tokenizer_source, else the base model, else the first model)"
        )
    vocabulary = tokenizer.get_vocab()
    for path in paths:
        if os.path.realpath(path) == os.path.realpath(source):
            continue
        other = _load_tokenizer(path, trust_remote_code)
        if other is None:
            continue
        theirs = other.get_vocab()
        if theirs != vocabulary:
            differing = len(set(theirs.items()) ^ set(vocabulary.items()))
            raise ValueError(
                f"the tokenizers of {source} ({len(vocabulary)} tokens) and {path} "
                f"({len(theirs)} tokens) differ ({differing} token ids); one text cannot "
                "be scored the same way for both"
            )
    return tokenizer


def _token_ids(name: str, documents: Sequence[Document], tokenizer, max_length: int) -> HeldOutFile:
    kept: List[Tuple[int, ...]] = []
    skipped = 0
    for document in documents:
        if document.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(
                    f"{name} has chat 'messages' records, but the tokenizer has no chat "
                    "template to render them"
                )
            text = tokenizer.apply_chat_template(list(document.messages), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(document.text)["input_ids"]
        ids = tuple(ids[:max_length])
        if len(ids) < 2:
            skipped += 1
        else:
            kept.append(ids)
    if not kept:
        raise DataError(
            f"data file {name}: none of its {len(documents)} documents has 2 tokens or more"
        )
    return HeldOutFile(name, tuple(kept), skipped)


def prepare(
    candidates: CandidateSet,
    data: Sequence[str],
    settings: CompareSettings,
    *,
    trust_remote_code: bool = False,
) -> Prepared:
    """Check models, tokenizers and data, and tokenize every file (see the module docstring)."""
    paths = _model_paths(candidates)
    _check_causal(paths, trust_remote_code)
    source = tokenizer_source(candidates.candidates[0].recipe or {})
    tokenizer = _tokenizer(paths, source, trust_remote_code)
    files = tuple(
        _token_ids(
            name,
            load_documents(name, max_documents=settings.max_documents, seed=settings.seed),
            tokenizer,
            settings.max_length,
        )
        for name in data
    )
    return Prepared(candidates, files, source)


def _placement(options: MergeOptions) -> Tuple[Dict[str, Any], bool]:
    """``from_pretrained`` keywords for the device, and whether it spreads the model."""
    device = options.device or ("cuda" if options.cuda else "cpu")
    if device == "cpu":
        return {}, False
    if device in ("cuda", "auto"):
        return {"device_map": "auto"}, True
    return {"device_map": {"": device}}, True


def _batches(lengths: Sequence[int], batch_tokens: int) -> List[List[int]]:
    """Document indices, longest first, grouped so a padded batch holds at most ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: List[List[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@contextlib.contextmanager
def _loading_bar(shown: bool) -> Iterator[None]:
    """transformers' weight-loading progress bar, hidden unless ``shown``."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    if enabled and not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and not shown:
            transformers_logging.enable_progress_bar()


def evaluate_model(
    path: str,
    files: Sequence[HeldOutFile],
    options: MergeOptions,
    batch_tokens: int,
    *,
    label: str = "",
) -> List[torch.Tensor]:
    """Per file, each document's NLL sum (float64, in the file's order) under the model at ``path``."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    placement, _ = _placement(options)
    with _loading_bar(not options.quiet):
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype="auto", trust_remote_code=options.trust_remote_code, **placement
        )
    model.eval()
    device = model.get_input_embeddings().weight.device
    results = []
    total = sum(len(f.token_ids) for f in files)
    with (
        tqdm(total=total, desc=f"Evaluating {label}", disable=options.quiet, leave=False) as bar,
        torch.inference_mode(),
    ):
        for held_out in files:
            lengths = [len(ids) for ids in held_out.token_ids]
            sums = torch.zeros(len(lengths), dtype=torch.float64)
            for batch in _batches(lengths, batch_tokens):
                width = lengths[batch[0]]
                input_ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, index in enumerate(batch):
                    ids = held_out.token_ids[index]
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                kwargs = {"attention_mask": mask.to(device)} if len(batch) > 1 else {}
                logits = model(input_ids=input_ids.to(device), **kwargs).logits
                batch_sums, _ = document_losses(logits, input_ids, [lengths[i] for i in batch])
                sums[batch] = torch.tensor(batch_sums, dtype=torch.float64)
                bar.update(len(batch))
            results.append(sums)
    del model
    return results


def merge_candidate(
    candidate: Candidate,
    out_path: str,
    options: MergeOptions,
    *,
    keep: bool = False,
    overwrite: bool = False,
) -> None:
    """Merge ``candidate.recipe`` into ``out_path`` through mergekit's executor.

    NAN recipes go through :func:`~mergekit_nan.commands.merge.merge_recipe`
    (any granularity, atomic), others through ``run_merge`` inside an
    :func:`~mergekit_nan.commands.output.atomic_directory`. With ``keep`` the
    tokenizer and a model card are written as ``mergekit-nan merge`` would.
    """
    from mergekit.merge import run_merge

    from mergekit_nan.commands.merge import merge_recipe
    from mergekit_nan.commands.output import atomic_directory
    from mergekit_nan.doctor.guard import suspended
    from mergekit_nan.doctor.recipe_walk import involves_nan

    assert candidate.recipe is not None
    config = _config(candidate.recipe)
    source = yaml.safe_dump(candidate.recipe, sort_keys=False)
    options = options.model_copy(
        update={"copy_tokenizer": keep, "write_model_card": keep and options.write_model_card}
    )
    with suspended():  # compare checked the recipes before the first merge
        if involves_nan(candidate.recipe):
            merge_recipe(
                config,
                out_path,
                options,
                config_source=source,
                source_name=candidate.label,
                overwrite=overwrite,
            )
        else:
            target = Path(os.path.realpath(os.path.expanduser(out_path)))
            # mergekit's own card would name the partial directory.
            options = options.model_copy(update={"write_model_card": False})
            with atomic_directory(target, overwrite=overwrite) as partial:
                run_merge(config, str(partial), options=options, config_source=source)


def _forget_inputs() -> None:
    """Close mergekit's cached input readers (their mapped pages) before evaluating."""
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()
    LoaderCache().loaders.clear()


@contextlib.contextmanager
def _scratch(work_dir: Optional[str]):
    with tempfile.TemporaryDirectory(prefix="mergekit-nan-compare-", dir=work_dir) as directory:
        yield Path(directory)


def run_compare(
    prepared: Prepared,
    options: MergeOptions,
    settings: CompareSettings,
    *,
    echo: Callable[[str], None] = print,
) -> List[List[DocumentLosses]]:
    """Merge and evaluate every candidate; ``[candidate][file]`` document losses.

    Each merged candidate lives in a temporary directory (under
    ``settings.work_dir``) only while it is evaluated.
    """
    losses: List[List[DocumentLosses]] = []
    token_counts = [
        torch.tensor([len(ids) - 1 for ids in f.token_ids], dtype=torch.long)
        for f in prepared.files
    ]
    for number, candidate in enumerate(prepared.candidates.candidates, start=1):
        count = len(prepared.candidates.candidates)
        if candidate.recipe is None:
            echo(f"[{number}/{count}] {candidate.label}: evaluating {candidate.model}")
            sums = evaluate_model(
                str(candidate.model),
                prepared.files,
                options,
                settings.batch_tokens,
                label=candidate.label,
            )
        else:
            echo(f"[{number}/{count}] {candidate.label}: merging and evaluating")
            with _scratch(settings.work_dir) as scratch:
                merge_candidate(candidate, str(scratch / "model"), options)
                _forget_inputs()
                sums = evaluate_model(
                    str(scratch / "model"),
                    prepared.files,
                    options,
                    settings.batch_tokens,
                    label=candidate.label,
                )
        losses.append([DocumentLosses(s, t) for s, t in zip(sums, token_counts)])
    return losses
