"""``mergekit-nan check``: a recipe doctor for any mergekit recipe, NAN or not.

:func:`check_recipe` never reads tensor data, so it answers in seconds even
for a 70B recipe. Per recipe document it collects:

1. the recipe's own findings (:func:`mergekit_nan.doctor.recipe_checks.recipe_findings`);
2. the models' findings (:mod:`mergekit_nan.doctor.model_checks`, from
   :mod:`mergekit_nan.doctor.model_files`): found offline, complete, same
   architecture, vocabulary and dtype;
3. mergekit's plan, made from the headers
   (:func:`mergekit_nan.doctor.plan_checks.plan_findings`): per-tensor
   parameters and ``shape-mismatch``;
4. the job estimate (:mod:`mergekit_nan.doctor.estimate`) and, with ``out_path``,
   ``disk-space``.

With ``out_path``, the whole recipe is also checked against where it will be
written (:mod:`mergekit_nan.doctor.outputs`): ``output-overwrites-input``
and ``output-not-empty``.

With ``downloads=True`` (the stock-command guard), a Hugging Face model that
is not in the local cache is not an error: mergekit downloads it. Such a
recipe is then not planned from headers. With ``plan=False`` (the guard,
which checks mergekit's own plan when it is made) nothing is planned here.

A multi-document recipe (``mergekit-multi``) is checked document by
document; ``where`` then starts with the stage's ``name`` (``final`` for the
unnamed one) and a colon, e.g. ``first:models[1].model``. A stage that merges
an earlier stage's output is not planned (that model does not exist yet): an
``info`` finding says so.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml
from mergekit.options import MergeOptions

from mergekit_nan.doctor.adapters import adapter_findings
from mergekit_nan.doctor.estimate import Estimate, estimate_job
from mergekit_nan.doctor.findings import Finding, format_findings
from mergekit_nan.doctor.model_checks import model_findings
from mergekit_nan.doctor.model_files import ModelFacts, collect_models
from mergekit_nan.doctor.outputs import output_findings
from mergekit_nan.doctor.plan_checks import plan_findings, readable_error
from mergekit_nan.errors import RecipeError
from mergekit_nan.recipe import RecipeFile, looks_like_repo, read_recipe

__all__ = ["CheckReport", "check_recipe"]

FINAL_STAGE = "final"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class CheckReport:
    """Everything :func:`check_recipe` found: findings (no duplicates) and one estimate per stage."""

    recipe: str
    findings: Tuple[Finding, ...]
    estimates: Tuple[Estimate, ...]
    models: Tuple[ModelFacts, ...] = ()
    """The models as found on disk, every stage's (those that were looked for)."""

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


def _documents(source: Union[str, os.PathLike[str], RecipeFile, Mapping[str, Any]]) -> List[Any]:
    if isinstance(source, Mapping):
        return [source]
    recipe = source if isinstance(source, RecipeFile) else read_recipe(os.fspath(source))
    return list(recipe.documents)


def unreadable_report(label: str, error: yaml.YAMLError) -> CheckReport:
    """The report on a recipe file that is not YAML: one ``invalid-recipe`` error."""
    return CheckReport(label, (_invalid(readable_error(error)),), ())


def _invalid(message: str) -> Finding:
    return Finding(
        "error",
        "invalid-recipe",
        "",
        f"mergekit cannot read the recipe: {message}",
        "see mergekit's recipe format",
    )


def _downloadable(models: Sequence[ModelFacts]) -> List[ModelFacts]:
    """Models missing locally that mergekit would fetch from the Hugging Face hub."""
    return [
        model
        for model in models
        if model.missing and all(looks_like_repo(part.split("@")[0]) for part in model.missing)
    ]


def _check_document(
    data: Mapping[str, Any],
    *,
    stage: Optional[str],
    produced: Sequence[str],
    out_path: Optional[str],
    options: MergeOptions,
    downloads: bool,
    plan: bool,
    found_models: List[ModelFacts],
) -> Tuple[List[Finding], Optional[Estimate]]:
    from mergekit.config import MergeConfiguration

    from mergekit_nan.doctor.recipe_checks import recipe_findings

    findings: List[Finding] = []
    try:
        findings.extend(recipe_findings(data))
    except RecipeError as error:
        findings.append(_invalid(readable_error(error)))
    try:
        config = MergeConfiguration.model_validate(dict(data))
    except Exception as error:
        return findings + [_invalid(readable_error(error))], None
    adapters = adapter_findings(config)
    if adapters is not None:  # LoRA adapters merged as factors: no full models to plan
        return findings + adapters, None
    models = collect_models(data, cache_dir=options.transformers_cache, produced=produced)
    found_models.extend(models)
    fetched = _downloadable(models) if downloads else []
    if fetched:
        # mergekit downloads them; without their headers the recipe cannot be planned here.
        models = [model for model in models if model not in fetched]
    by_reference = {m.reference: m for m in models}
    tokenizer_set = config.tokenizer_source is not None or config.tokenizer is not None
    findings.extend(model_findings(models, tokenizer_set=tokenizer_set, recipe_dtype=config.dtype))
    planned = None
    if plan and not fetched:
        explained = any(finding.level == "error" for finding in findings)
        plan_notes, planned = plan_findings(
            config, models, produced, options, tokenizer_set, explained
        )
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
    source: Union[str, os.PathLike[str], RecipeFile, Mapping[str, Any]],
    *,
    out_path: Optional[str] = None,
    options: Optional[MergeOptions] = None,
    downloads: bool = False,
    stage_outputs: Sequence[Tuple[str, str]] = (),
    plan: bool = True,
) -> CheckReport:
    """Check a recipe file (one or several YAML documents) or mapping without reading tensors.

    ``out_path`` is where the merge will write (the unnamed, final stage of a
    multi-document recipe); ``stage_outputs`` the other stages' output
    directories, as ``(stage, directory)``, when known; ``options`` are
    mergekit's (``transformers_cache``, ``trust_remote_code`` matter here);
    ``downloads`` and ``plan``: see the module docstring. Raises ``FileNotFoundError``
    for a missing file; every problem of the recipe itself becomes a finding.
    """
    options = options or MergeOptions()
    if isinstance(source, Mapping):
        label = "<recipe>"
    else:
        label = source.path if isinstance(source, RecipeFile) else os.fspath(source)
    try:
        documents = _documents(source)
    except yaml.YAMLError as error:
        return unreadable_report(label, error)
    if not documents or not all(isinstance(d, Mapping) for d in documents):
        return CheckReport(label, (_invalid("expected one or more YAML mappings"),), ())
    multi = len(documents) > 1
    produced = [str(d["name"]) for d in documents if multi and d.get("name") is not None]
    findings: List[Finding] = []
    if out_path is not None:
        findings.extend(
            output_findings(
                documents,
                out_path,
                cache_dir=options.transformers_cache,
                stage_outputs=stage_outputs,
            )
        )
    estimates: List[Estimate] = []
    models: List[ModelFacts] = []
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
            downloads=downloads,
            plan=plan,
            found_models=models,
        )
        findings.extend(_in_stage(f, stage) for f in found)
        if estimate is not None:
            estimates.append(estimate)
    return CheckReport(label, _unique(findings), tuple(estimates), tuple(models))
