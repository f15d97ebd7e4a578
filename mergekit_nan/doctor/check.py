"""``mergekit-nan check``: a recipe doctor for any mergekit recipe, NAN or not.

:func:`check_recipe` never reads tensor data, so it answers in seconds even
for a 70B recipe. Per recipe document it collects:

1. the recipe's own findings (:func:`mergekit_nan.doctor.recipe_checks.recipe_findings`);
2. the models' findings (:mod:`mergekit_nan.doctor.model_checks`, from
   :mod:`mergekit_nan.doctor.model_files`): found offline, complete, same
   architecture, vocabulary and dtype;
3. mergekit's plan: the stock planner (``MergePlanner._plan``) run with
   loaders built from the safetensors headers and with the Hugging Face hub
   in offline mode, so planning reads ``config.json``, index files and
   headers only. A planner failure becomes one ``plan-failed`` error. The
   plan gives the per-tensor parameters
   (:func:`mergekit_nan.doctor.recipe_checks.planned_findings`) and the input
   tensors of every output tensor (``shape-mismatch``);
4. the job estimate (:mod:`mergekit_nan.doctor.estimate`) and, with ``out_path``,
   ``disk-space``.

A multi-document recipe (``mergekit-multi``) is checked document by
document; ``where`` then starts with the stage's ``name`` (``final`` for the
unnamed one) and a colon, e.g. ``first:models[1].model``. A stage that merges
an earlier stage's output is not planned (that model does not exist yet): an
``info`` finding says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import yaml
from mergekit.options import MergeOptions

from mergekit_nan.doctor.estimate import Estimate, estimate_job
from mergekit_nan.doctor.findings import Finding, format_findings
from mergekit_nan.doctor.model_checks import model_findings, shape_findings
from mergekit_nan.doctor.model_files import ModelFacts, PlannedTensor, collect_models
from mergekit_nan.errors import RecipeError

__all__ = ["CheckReport", "check_recipe"]

FINAL_STAGE = "final"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class CheckReport:
    """Everything :func:`check_recipe` found: findings (no duplicates) and one estimate per stage."""

    recipe: str
    findings: Tuple[Finding, ...]
    estimates: Tuple[Estimate, ...]

    @property
    def errors(self) -> Tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self) -> Tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "warning")

    @property
    def estimate(self) -> Optional[Estimate]:
        """The estimate of the last stage (the only one for a single recipe)."""
        return self.estimates[-1] if self.estimates else None

    def exit_code(self, *, strict: bool = False) -> int:
        """1 with errors (with ``strict``: with warnings too), else 0."""
        return 1 if self.errors or (strict and self.warnings) else 0

    def summary(self) -> str:
        return f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"

    def lines(self, levels: Sequence[str] = ("error", "warning", "info")) -> List[str]:
        """One line per finding of ``levels``, errors first."""
        return format_findings([f for f in self.findings if f.level in levels])

    def render(self) -> str:
        """The text ``mergekit-nan check`` prints: every finding, then the summary."""
        return "\n".join(self.lines() + [self.summary()])

    def to_json(self) -> Dict[str, Any]:
        return {
            "recipe": self.recipe,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [f.to_json() for f in self.findings],
            "estimates": [e.to_json() for e in self.estimates],
        }


def _documents(source: Union[str, os.PathLike[str], Mapping[str, Any]]) -> List[Any]:
    if isinstance(source, Mapping):
        return [source]
    with open(source, encoding="utf-8") as file:
        text = file.read()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


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


def _plan(config, models: Sequence[ModelFacts], options: MergeOptions):
    """mergekit's planner after ``_plan()``, reading configs and headers only.

    Architectures are allowed to differ (``architecture-mismatch`` already
    says what mergekit needs for that), so the plan can be checked further.
    """
    from mergekit_nan.granularity import without_granularity
    from mergekit_nan.planning import plan_recipe
    from mergekit_nan.registration import register_methods

    register_methods()
    options = options.model_copy(update={"allow_crimes": True})
    # nan_granularity is the recipe checks' business; the stock validator would refuse
    # layer/model here, which mergekit-nan merge (and inspect, freeze) honour.
    config = without_granularity(config)
    with _offline(options.transformers_cache), _header_loaders(models), _quiet_transformers():
        return plan_recipe(config, options)


def _planned_tensors(planner) -> List[PlannedTensor]:
    from mergekit.io.tasks import GatherTensors

    tensors = []
    for weight, task in planner._tensors:
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


def _invalid(message: str) -> Finding:
    return Finding(
        "error",
        "invalid-recipe",
        "",
        f"mergekit cannot read the recipe: {message}",
        "see mergekit's recipe format",
    )


def _plan_findings(
    config,
    models: Sequence[ModelFacts],
    produced: Sequence[str],
    options: MergeOptions,
    tokenizer_set: bool,
) -> Tuple[List[Finding], Optional[List[PlannedTensor]]]:
    """Plan when every model is there: the plan's findings and its tensors (None: no plan)."""
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
        planner = _plan(config, models, options)
    except Exception as error:
        message = f"mergekit cannot plan this merge: {_one_line(error)}"
        return [Finding("error", "plan-failed", "", message)], None
    planned = _planned_tensors(planner)
    by_reference = {m.reference: m for m in models}
    findings = planned_findings(planner)
    findings.extend(shape_findings(planned, by_reference, tokenizer_set=tokenizer_set))
    return findings, planned


def _check_document(
    data: Mapping[str, Any],
    *,
    stage: Optional[str],
    produced: Sequence[str],
    out_path: Optional[str],
    options: MergeOptions,
) -> Tuple[List[Finding], Optional[Estimate]]:
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from mergekit_nan.doctor.recipe_checks import recipe_findings

    findings: List[Finding] = []
    try:
        findings.extend(recipe_findings(data))
    except RecipeError as error:
        findings.append(_invalid(_one_line(error)))
    try:
        config = MergeConfiguration.model_validate(dict(data))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'recipe'}: {e['msg']}"
            for e in error.errors()
        )
        return findings + [_invalid(problems)], None
    except Exception as error:
        return findings + [_invalid(_one_line(error))], None
    models = collect_models(data, cache_dir=options.transformers_cache, produced=produced)
    by_reference = {m.reference: m for m in models}
    tokenizer_set = config.tokenizer_source is not None or config.tokenizer is not None
    findings.extend(model_findings(models, tokenizer_set=tokenizer_set, recipe_dtype=config.dtype))
    plan_notes, planned = _plan_findings(config, models, produced, options, tokenizer_set)
    findings.extend(plan_notes)
    estimate = estimate_job(
        planned,
        by_reference,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        out_path=out_path,
        stage=stage,
    )
    findings.append(estimate.finding())
    findings.extend(estimate.disk_findings())
    return findings, estimate


def _in_stage(finding: Finding, stage: Optional[str]) -> Finding:
    if stage is None:
        return finding
    where = f"{stage}:{finding.where}" if finding.where else stage
    return dataclasses.replace(finding, where=where)


def _unique(findings: Sequence[Finding]) -> Tuple[Finding, ...]:
    seen = set()
    kept = []
    for finding in findings:
        key = (finding.code, finding.where, finding.tensor)
        if key not in seen:
            seen.add(key)
            kept.append(finding)
    return tuple(kept)


def check_recipe(
    source: Union[str, os.PathLike[str], Mapping[str, Any]],
    *,
    out_path: Optional[str] = None,
    options: Optional[MergeOptions] = None,
) -> CheckReport:
    """Check a recipe file (one or several YAML documents) or mapping without reading tensors.

    ``out_path`` is where the merge will write (the unnamed, final stage of a
    multi-document recipe); ``options`` are mergekit's (``transformers_cache``,
    ``trust_remote_code`` matter here). Raises ``FileNotFoundError`` for a
    missing file; every problem of the recipe itself becomes a finding.
    """
    options = options or MergeOptions()
    label = "<recipe>" if isinstance(source, Mapping) else os.fspath(source)
    try:
        documents = _documents(source)
    except yaml.YAMLError as error:
        return CheckReport(label, (_invalid(_one_line(error)),), ())
    if not documents or not all(isinstance(d, Mapping) for d in documents):
        return CheckReport(label, (_invalid("expected one or more YAML mappings"),), ())
    multi = len(documents) > 1
    produced = [str(d["name"]) for d in documents if multi and d.get("name") is not None]
    findings: List[Finding] = []
    estimates: List[Estimate] = []
    for document in documents:
        data = dict(document)
        stage = None
        if multi:
            name = data.pop("name", None)
            stage = FINAL_STAGE if name is None else str(name)
        final = not multi or stage == FINAL_STAGE
        found, estimate = _check_document(
            data,
            stage=stage,
            produced=produced,
            out_path=out_path if final else None,
            options=options,
        )
        findings.extend(_in_stage(f, stage) for f in found)
        if estimate is not None:
            estimates.append(estimate)
    return CheckReport(label, _unique(findings), tuple(estimates))
