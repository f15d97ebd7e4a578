"""``mergekit-nan compare``: does NAN, or this recipe, help on the user's own held-out text?

Order of work, so that every mistake is found before the first merge:

1. :func:`prepare` builds the candidates
   (:mod:`~mergekit_nan.commands.compare.candidates`), checks that every model
   is a causal language model, loads the tokenizer the merge would copy
   (``tokenizer_source`` naming a model, else the base, else the first model)
   and refuses models whose tokenizers differ, reads every data file
   (:mod:`mergekit_nan.doctor.heldout`) and tokenizes its documents:
   ``tokenizer(text)`` with its default special tokens (a chat ``messages``
   record: the chat template's text, which carries its own special tokens),
   cut to ``max_length``; documents of fewer than 2 tokens are skipped and
   counted.
2. :mod:`~mergekit_nan.commands.compare.score` merges, scores and deletes each
   candidate in turn.
3. The statistics (:mod:`mergekit_nan.evaluation`): per file and overall
   (every file's documents pooled), nats per token, a seeded bootstrap 95 %
   interval over documents, and each candidate's paired bootstrap difference
   from the baseline. With more than two merged candidates the best is picked
   on one seeded half of each file's documents and its difference from the
   baseline measured on the other half.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from mergekit.config import MergeConfiguration

from mergekit_nan.commands.compare.candidates import CandidateSet
from mergekit_nan.commands.compare.tasks import TaskPlan
from mergekit_nan.doctor.heldout import DataError, Document, load_documents

__all__ = ["CompareSettings", "HeldOutFile", "Prepared", "prepare", "tokenizer_source"]


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
    tasks: Optional[TaskPlan] = None


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
