"""Findings about a recipe's models: what ``mergekit-nan check`` sees without tensor data.

From :mod:`mergekit_nan.doctor.model_files` (configs and safetensors headers):
``model-not-found``, ``incomplete-model`` (no config, no weights, a missing
shard, a file shorter than its header says), ``shapes-unchecked`` (pickled
weights), ``architecture-mismatch``, ``vocab-mismatch`` and
``dtype-mismatch``; with mergekit's plan, ``shape-mismatch``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from mergekit.common import ModelReference

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.model_files import ModelFacts, PlannedTensor
from mergekit_nan.recipe import looks_like_repo

__all__ = ["model_findings", "shape_findings"]


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) and "vocab_size" in nested else config


def _reference_model(models: Sequence[ModelFacts]) -> ModelFacts:
    """The base model when it is among ``models``, else the first."""
    return next((m for m in models if "base_model" in m.places), models[0])


def _not_found(model: ModelFacts) -> List[Finding]:
    findings = []
    for part in model.missing:
        path = part.split("@")[0]
        adapter = part != str(model.reference.model)
        if looks_like_repo(path):
            what = f"its adapter {part}" if adapter else part
            why = f"{what} is neither a local directory nor in the Hugging Face cache"
            fix = f"download it first (hf download {path}) or give a local path"
        else:
            why = f"no {'adapter ' if adapter else ''}directory {part}"
            fix = "correct the path"
        for where in model.places:
            message = f"model {model.label} not found: {why}."
            findings.append(Finding("error", "model-not-found", where, message, fix))
    return findings


def _architecture(model: ModelFacts) -> Tuple[Tuple[str, ...], Optional[str]]:
    config = model.config or {}
    return tuple(config.get("architectures") or ()), config.get("model_type")


def _describe_architecture(key: Tuple[Tuple[str, ...], Optional[str]]) -> str:
    names, model_type = key
    return f"{'/'.join(names) or 'no architectures'} (model_type {model_type})"


def _architecture_findings(models: Sequence[ModelFacts]) -> List[Finding]:
    reference = _reference_model(models)
    expected = _architecture(reference)
    return [
        Finding(
            "warning",
            "architecture-mismatch",
            model.where,
            f"{model.label} is {_describe_architecture(_architecture(model))} but "
            f"{reference.label} is {_describe_architecture(expected)}; mergekit refuses "
            "to mix architectures unless run with --allow-crimes.",
            "merge models of one architecture, or pass --allow-crimes if you mean it",
        )
        for model in models
        if _architecture(model) != expected
    ]


def _vocab_size(model: ModelFacts) -> Optional[int]:
    value = _text_config(model.config or {}).get("vocab_size")
    return value if isinstance(value, int) else None


def _vocab_findings(models: Sequence[ModelFacts], tokenizer_set: bool) -> List[Finding]:
    known = [m for m in models if _vocab_size(m) is not None]
    if not known:
        return []
    reference = _reference_model(known)
    findings = []
    for model in known:
        if _vocab_size(model) == _vocab_size(reference):
            continue
        message = (
            f"{model.label} has a vocabulary of {_vocab_size(model)} tokens but "
            f"{reference.label} has {_vocab_size(reference)}"
        )
        if tokenizer_set:
            findings.append(
                Finding(
                    "info",
                    "vocab-mismatch",
                    model.where,
                    message + "; the recipe's tokenizer settings align the embedding rows.",
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "vocab-mismatch",
                    model.where,
                    message + "; without tokenizer settings their embeddings cannot be merged.",
                    "add `tokenizer_source: union` (keep every model's tokens) or "
                    "`tokenizer_source: base` (the base model's tokens)",
                )
            )
    return findings


def _main_dtype(model: ModelFacts) -> Optional[str]:
    """The floating-point dtype holding most of a model's bytes."""
    sizes: Counter = Counter()
    for tensor in (model.tensors or {}).values():
        if tensor.is_float:
            sizes[tensor.dtype] += tensor.nbytes
    return sizes.most_common(1)[0][0] if sizes else None


def _dtype_findings(models: Sequence[ModelFacts], recipe_dtype: Optional[str]) -> List[Finding]:
    known = [m for m in models if _main_dtype(m) is not None]
    if not known:
        return []
    reference = _reference_model(known)
    findings = []
    for model in known:
        if _main_dtype(model) == _main_dtype(reference):
            continue
        message = (
            f"{model.label} stores {_main_dtype(model)} but {reference.label} "
            f"stores {_main_dtype(reference)}"
        )
        if recipe_dtype:
            findings.append(
                Finding(
                    "info",
                    "dtype-mismatch",
                    model.where,
                    f"{message}; every input is converted to {recipe_dtype} (the recipe's dtype).",
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "dtype-mismatch",
                    model.where,
                    f"{message}, and the recipe sets no dtype, so the merge computes "
                    "in whatever each tensor's inputs promote to.",
                    "set `dtype:` (e.g. bfloat16) to choose the compute dtype",
                )
            )
    return findings


def model_findings(
    models: Sequence[ModelFacts], *, tokenizer_set: bool, recipe_dtype: Optional[str]
) -> List[Finding]:
    """Findings about the models themselves, before any planning."""
    findings: List[Finding] = []
    for model in models:
        findings.extend(_not_found(model))
        problems = model.problems + model.truncated
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            findings.append(
                Finding(
                    "error",
                    "incomplete-model",
                    model.where,
                    f"{model.label}: {problems[0]}{more}.",
                    "download or copy the model again",
                )
            )
        if model.pickled and not model.problems:
            findings.append(
                Finding(
                    "info",
                    "shapes-unchecked",
                    model.where,
                    f"{model.label} stores pytorch_model.bin (pickle) weights, whose "
                    "shapes cannot be read without unpickling; its shapes were not checked.",
                )
            )
    weights = [m for m in models if m.config is not None and not m.tokenizer_only]
    if len(weights) > 1:
        findings.extend(_architecture_findings(weights))
        findings.extend(_vocab_findings(weights, tokenizer_set))
        findings.extend(_dtype_findings(weights, recipe_dtype))
    return findings


_SHAPE_FINDINGS_PER_PAIR = 8


def _only_vocab_differs(a: Tuple[int, ...], b: Tuple[int, ...], axis: Optional[int]) -> bool:
    if axis is None or len(a) != len(b) or axis >= len(a):
        return False
    return all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis)


def shape_findings(
    planned: Sequence[PlannedTensor],
    models: Mapping[ModelReference, ModelFacts],
    *,
    tokenizer_set: bool,
) -> List[Finding]:
    """``shape-mismatch`` errors: inputs of one output tensor whose header shapes differ.

    Each input is compared with the slice's base model (or the first input).
    Rows along the vocabulary axis may differ when the recipe sets a
    tokenizer, which aligns them. At most a few tensors are named per pair of
    models; one more finding counts the rest.
    """
    findings: List[Finding] = []
    counts: Counter = Counter()
    for tensor in planned:
        present = []
        for reference, names in tensor.inputs:
            facts = models.get(reference)
            header = facts.header(names) if facts is not None else None
            if facts is not None and header is not None:
                present.append((facts, header))
        if len(present) < 2:
            continue
        first = next((p for p in present if p[0].reference == tensor.base), present[0])
        ref_facts, ref_header = first
        for facts, header in present:
            if header.shape == ref_header.shape:
                continue
            vocab = _only_vocab_differs(header.shape, ref_header.shape, tensor.vocabulary_axis)
            if vocab and tokenizer_set:
                continue
            pair = (facts.reference, ref_facts.reference)
            counts[pair] += 1
            if counts[pair] > _SHAPE_FINDINGS_PER_PAIR:
                continue
            fix = (
                "add `tokenizer_source: union` or `tokenizer_source: base` so mergekit aligns "
                "the vocabulary rows"
                if vocab
                else "merge models of the same size, or pick compatible layers with slices"
            )
            findings.append(
                Finding(
                    "error",
                    "shape-mismatch",
                    facts.where,
                    f"tensor {tensor.name!r} has shape {list(header.shape)} in {facts.label} but "
                    f"{list(ref_header.shape)} in {ref_facts.label}; mergekit cannot merge "
                    "tensors of different shapes.",
                    fix,
                    tensor=tensor.name,
                )
            )
    for (model, reference), count in counts.items():
        if count > _SHAPE_FINDINGS_PER_PAIR:
            facts, ref_facts = models[model], models[reference]
            findings.append(
                Finding(
                    "error",
                    "shape-mismatch",
                    facts.where,
                    f"{count - _SHAPE_FINDINGS_PER_PAIR} more tensors of {facts.label} differ "
                    f"in shape from {ref_facts.label} ({count} in all).",
                    "merge models of the same size",
                )
            )
    return findings
