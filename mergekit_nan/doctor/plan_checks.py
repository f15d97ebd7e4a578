"""mergekit's plan of a recipe, made from headers alone, and what it shows.

:func:`plan_findings` runs the stock planner (``MergePlanner._plan``) with
loaders built from the safetensors headers already read and with the Hugging
Face hub in offline mode, so planning reads ``config.json``, index files and
headers only. The plan gives the per-tensor parameters
(:func:`mergekit_nan.doctor.recipe_checks.planned_findings`) and the input
tensors of every output tensor (``shape-mismatch``). A planner failure
becomes one ``plan-failed`` error in plain words, unless the recipe's own
errors already explain it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

from mergekit.options import MergeOptions

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.model_checks import shape_findings
from mergekit_nan.doctor.model_files import ModelFacts, PlannedTensor
from mergekit_nan.mergekit_compat import plan_recipe, planned_tasks

__all__ = ["plan_findings", "planned_tensors", "readable_error"]


def readable_error(error: BaseException) -> str:
    """One line for an exception; a pydantic ``ValidationError`` as ``where: what (got value)``."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "recipe"
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            problems.append(f"{where}: {item['msg'][:1].lower()}{item['msg'][1:]}{shown}")
        return "; ".join(problems)
    text = " ".join(str(error).split()).replace(' in "<unicode string>"', "")
    return text or type(error).__name__


@contextlib.contextmanager
def _offline(cache_dir: Optional[str]) -> Iterator[None]:
    """Hugging Face hub offline mode, in ``cache_dir`` if given, for the duration.

    transformers reads both settings from ``huggingface_hub.constants`` on each
    call; mergekit reads configs without a cache directory, so ``cache_dir``
    becomes the default cache while planning.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE = True
    if cache_dir is not None:
        constants.HF_HUB_CACHE = cache_dir
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = previous


@contextlib.contextmanager
def _header_loaders(models: Sequence[ModelFacts]) -> Iterator[None]:
    """mergekit's loader cache, holding indexes built from the headers already read.

    mergekit's own index opens each single-file checkpoint with
    ``safetensors.safe_open`` (which checks the data is all there), unpickles
    ``pytorch_model.bin`` files, and merges LoRA adapters into their base
    model; the planner needs tensor names only. The cache's previous entries
    come back afterwards.
    """
    from mergekit.io import LazyTensorLoader, ShardedTensorIndex
    from mergekit.io.lazy_tensor_loader import ShardInfo
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    saved = dict(cache.loaders)
    for model in models:
        if model.directory is None or model.tokenizer_only:
            continue
        files = sorted(set(model.shards.values()))
        index = ShardedTensorIndex(
            base_path=model.directory,
            is_safetensors=not model.pickled,
            tensor_paths=dict(model.shards),
            shards=[ShardInfo(f, [k for k, v in model.shards.items() if v == f]) for f in files],
        )
        cache.loaders[model.reference] = LazyTensorLoader(index, lazy_unpickle=False)
    try:
        yield
    finally:
        cache.loaders.clear()
        cache.loaders.update(saved)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off (mergekit's own config handling trips deprecations)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _stock_plan(config, models: Sequence[ModelFacts], options: MergeOptions):
    """mergekit's planner after ``_plan()``, reading configs and headers only.

    Architectures are allowed to differ (``architecture-mismatch`` already
    says what mergekit needs for that), so the plan can be checked further.
    """
    from mergekit_nan.granularity import without_granularity
    from mergekit_nan.registration import register_methods

    register_methods()
    options = options.model_copy(update={"allow_crimes": True})
    # nan_granularity is the recipe checks' business; the stock validator would refuse
    # layer/model here, which mergekit-nan merge (and inspect, freeze) honour.
    config = without_granularity(config)
    with _offline(options.transformers_cache), _header_loaders(models), _quiet_transformers():
        return plan_recipe(config, options)


def planned_tensors(planner) -> List[PlannedTensor]:
    from mergekit.io.tasks import GatherTensors

    tensors = []
    for weight, task in planned_tasks(planner):
        gather = task.gather_tensors
        while not isinstance(gather, GatherTensors):  # vocabulary permutation/truncation
            gather = gather.gather_tensors
        inputs = []
        for model in task.model_order:
            info = gather.weight_info[model]
            names = (info.name, *(info.aliases or ()), *(info.tied_names or ()))
            inputs.append((model, names))
        tensors.append(
            PlannedTensor(
                name=weight.name,
                inputs=tuple(inputs),
                vocabulary_axis=weight.vocabulary_axis,
                force_dtype=weight.force_dtype,
                base=task.base_model,
            )
        )
    return tensors


def _known_method(name: str) -> bool:
    """Whether mergekit knows the method (``recipe_findings`` reports an unknown one)."""
    from mergekit import merge_methods

    from mergekit_nan.registration import register_methods

    register_methods()
    try:
        merge_methods.get(name)
    except Exception:
        return False
    return True


def plan_findings(
    config,
    models: Sequence[ModelFacts],
    produced: Sequence[str],
    options: MergeOptions,
    tokenizer_set: bool,
    explained: bool = False,
) -> Tuple[List[Finding], Optional[List[PlannedTensor]]]:
    """Plan when every model is there: the plan's findings and its tensors (None: no plan).

    ``explained``: the recipe has errors already, which a planner failure only
    repeats; it is then not reported again.
    """
    from mergekit_nan.doctor.recipe_checks import planned_findings

    waiting = sorted({r.model.path for r in config.referenced_models()} & set(produced))
    if waiting:
        note = Finding(
            "info",
            "plan-skipped",
            "",
            f"this stage merges the output of stage {', '.join(waiting)}, which does not "
            "exist yet; its tensors were not planned or checked.",
        )
        return [note], None
    usable = all(m.usable for m in models if not m.tokenizer_only)
    if not usable or not _known_method(config.merge_method):
        return [], None  # the missing models or the unknown method are findings already
    try:
        planner = _stock_plan(config, models, options)
    except Exception as error:
        if explained:
            return [], None
        message = f"mergekit cannot plan this merge: {readable_error(error)}"
        return [Finding("error", "plan-failed", "", message)], None
    planned = planned_tensors(planner)
    by_reference = {m.reference: m for m in models}
    findings = planned_findings(planner)
    findings.extend(shape_findings(planned, by_reference, tokenizer_set=tokenizer_set))
    return findings, planned
