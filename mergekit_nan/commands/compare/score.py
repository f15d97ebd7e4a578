"""``mergekit-nan compare``'s costly part: merge each candidate, score it, delete it.

:func:`run_compare` merges each candidate once through mergekit's own executor
(``run_merge``; :func:`~mergekit_nan.commands.merge.run.merge_recipe` for NAN
recipes, which measures layer and model granularity in its streaming pass) into
a temporary directory, closes mergekit's input readers, loads the model with
``transformers`` (``device_map`` on accelerators, so a model larger than one
device is spread), scores every file in batches (:func:`evaluate_model`) and
deletes it before the next merge: at most one merged model is on disk at a
time, and an error or Ctrl-C leaves none. Input models (``--inputs``) are
scored where they are.

Candidates of one :func:`~mergekit_nan.commands.compare.candidates.norm_group`
share a :class:`~mergekit_nan.shared_norms.NormTable`: the first NAN merge of
the group runs the norm pass, the later ones take its norms (and so merge
exactly the tensors they would have merged computing them). A ``layer`` or
``model`` candidate that finds the norms still reads the inputs once to plan
its frozen recipe, without the norm arithmetic.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_nan.commands.compare.candidates import Candidate, norm_group
from mergekit_nan.commands.compare.settings import CompareSettings, HeldOutFile, Prepared
from mergekit_nan.commands.compare.tasks import TaskPlan, TaskScores, score_tasks
from mergekit_nan.evaluation import DocumentLosses, document_losses
from mergekit_nan.shared_norms import NormTable, sharing

__all__ = ["Evaluation", "Scores", "evaluate_model", "load_model", "merge_candidate", "run_compare"]


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


def load_model(path: str, options: MergeOptions):
    """The causal LM at ``path``, in eval mode, on compare's device (once per candidate)."""
    from transformers import AutoModelForCausalLM

    placement, _ = _placement(options)
    with _loading_bar(not options.quiet):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", trust_remote_code=options.trust_remote_code, **placement
        )
    return model.eval()


def _file_sums(
    model, files: Sequence[HeldOutFile], options: MergeOptions, batch_tokens: int, label: str
) -> List[torch.Tensor]:
    from tqdm import tqdm

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
    return results


@dataclass(frozen=True)
class Evaluation:
    """One candidate scored: each file's document NLL sums, and its task results."""

    sums: List[torch.Tensor]
    tasks: Optional[TaskScores] = None


def evaluate_model(
    path: str,
    files: Sequence[HeldOutFile],
    options: MergeOptions,
    batch_tokens: int,
    *,
    label: str = "",
    tasks: Optional[TaskPlan] = None,
    tokenizer=None,
) -> Evaluation:
    """The model at ``path``, loaded once, scored on every file and every task.

    Per file each document's NLL sum (float64, in the file's order); with
    ``tasks``, lm-eval's results on the same loaded model (``tokenizer``: the
    one the merge would copy).
    """
    model = load_model(path, options)
    try:
        sums = _file_sums(model, files, options, batch_tokens, label)
        found = None
        if tasks is not None:
            found = score_tasks(
                model, tokenizer, tasks, quiet=options.quiet, verbose=bool(options.verbosity)
            )
    finally:
        # lm-eval's wrapper and the model refer to each other: only the cyclic collector
        # frees them, and a large model is few objects, so it would not run before the
        # next merge and the next model would come on top of this one.
        del model
        gc.collect()
    return Evaluation(sums, found)


def merge_candidate(
    candidate: Candidate,
    out_path: str,
    options: MergeOptions,
    *,
    keep: bool = False,
    overwrite: bool = False,
) -> None:
    """Merge ``candidate.recipe`` into ``out_path`` through mergekit's executor.

    Every recipe goes through :func:`~mergekit_nan.commands.merge.run.merge_recipe`
    (NAN at any granularity, stock methods as ``mergekit-yaml`` merges them;
    atomic either way). With ``keep`` the tokenizer and a model card are
    written as ``mergekit-nan merge`` would.
    """
    from mergekit_nan.commands.merge.run import merge_recipe
    from mergekit_nan.doctor.guard import suspended

    assert candidate.recipe is not None
    config = MergeConfiguration.model_validate(candidate.recipe)
    source = yaml.safe_dump(candidate.recipe, sort_keys=False)
    options = options.model_copy(
        update={"copy_tokenizer": keep, "write_model_card": keep and options.write_model_card}
    )
    with suspended():  # compare checked the recipes before the first merge
        merge_recipe(
            config,
            out_path,
            options,
            config_source=source,
            source_name=candidate.label,
            overwrite=overwrite,
        )


def _forget_inputs() -> None:
    """Close mergekit's cached input readers (their mapped pages) before evaluating."""
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()
    LoaderCache().loaders.clear()


@contextlib.contextmanager
def _scratch(work_dir: Optional[str]):
    with tempfile.TemporaryDirectory(prefix="mergekit-nan-compare-", dir=work_dir) as directory:
        yield Path(directory)


@dataclass(frozen=True)
class Scores:
    """Every candidate's results: ``losses[candidate][file]``, ``tasks[candidate]``."""

    losses: List[List[DocumentLosses]]
    tasks: List[TaskScores]


def _tokenizer(prepared: Prepared, options: MergeOptions):
    if prepared.tasks is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        prepared.tokenizer_model, trust_remote_code=options.trust_remote_code
    )


def run_compare(
    prepared: Prepared,
    options: MergeOptions,
    settings: CompareSettings,
    *,
    echo: Callable[[str], None] = print,
) -> Scores:
    """Merge and evaluate every candidate: each merged once, loaded once, scored on
    every file and every task.

    Each merged candidate lives in a temporary directory (under
    ``settings.work_dir``) only while it is evaluated.
    """
    losses: List[List[DocumentLosses]] = []
    task_scores: List[TaskScores] = []
    tables: Dict[str, NormTable] = {}
    tokenizer = _tokenizer(prepared, options)
    token_counts = [
        torch.tensor([len(ids) - 1 for ids in f.token_ids], dtype=torch.long)
        for f in prepared.files
    ]
    for number, candidate in enumerate(prepared.candidates.candidates, start=1):
        count = len(prepared.candidates.candidates)
        scoring = dict(label=candidate.label, tasks=prepared.tasks, tokenizer=tokenizer)
        if candidate.recipe is None:
            echo(f"[{number}/{count}] {candidate.label}: evaluating {candidate.model}")
            found = evaluate_model(
                str(candidate.model), prepared.files, options, settings.batch_tokens, **scoring
            )
        else:
            table = tables.setdefault(norm_group(candidate.recipe), NormTable())
            shared = " (norms of an earlier candidate)" if len(table) else ""
            echo(f"[{number}/{count}] {candidate.label}: merging{shared} and evaluating")
            with _scratch(settings.work_dir) as scratch:
                with sharing(table):
                    merge_candidate(candidate, str(scratch / "model"), options)
                _forget_inputs()
                found = evaluate_model(
                    str(scratch / "model"), prepared.files, options, settings.batch_tokens,
                    **scoring,
                )  # fmt: skip
        losses.append([DocumentLosses(s, t) for s, t in zip(found.sums, token_counts)])
        if found.tasks is not None:
            task_scores.append(found.tasks)
    return Scores(losses, task_scores)
