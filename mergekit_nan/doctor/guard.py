"""The recipe guard: the stock ``mergekit-yaml`` and ``mergekit-multi`` speak up about NAN recipes.

mergekit silently ignores parameters a method does not declare, and some NAN
mistakes only surface deep into a long merge, or never. For every recipe that
uses ``nan`` or a ``<method>+nan`` method or contains a ``nan_*`` key,
:func:`install_guard` (called by the start-up hook as mergekit's modules
load) makes mergekit run the checks of ``mergekit-nan check`` first:

* ``mergekit.merge.run_merge`` (behind ``mergekit-yaml``, each stage of
  ``mergekit-multi`` and the Python API): the check, against the output path
  too, before mergekit reads a model: the recipe's parameters, missing or
  incomplete models, malformed headers, ``output-overwrites-input``; then,
  as soon as mergekit has planned the merge and before it creates the output
  directory, the per-tensor values it resolved and the shapes of every
  output tensor's inputs (read from the headers already found), so the
  recipe is planned once. If the merge then fails into an output directory
  that did not exist before, that directory is removed, so no half-written
  model is left behind;
* the ``mergekit-yaml`` and ``mergekit-multi`` command lines: a recipe file
  that is not valid YAML or not a mergekit recipe; for ``mergekit-multi``,
  every stage and every output directory at once, before the first stage
  runs (a stage's output must not overwrite another stage's input);
* ``MergePlanner._plan`` (any other caller of mergekit's planner): the
  recipe's findings before planning and those on the per-tensor values
  mergekit resolved right after it.

Findings are reported as :mod:`~mergekit_nan.doctor.guard_report` says:
warnings logged once each, errors that stop a ``nan`` or ``<method>+nan``
recipe with one ``Error: ...`` message (exit status 1). Hugging Face models
that are not in the local cache are left to mergekit, which downloads them.
``nan_granularity: layer|model`` is an error in the stock commands, which can
only compute per-tensor coefficients.

The guard never changes a plan or a merge. For recipes without NAN it does
nothing at all, and if anything about mergekit's internals is not as expected
it skips its checks rather than getting in mergekit's way, saying which and
why at INFO level (mergekit's ``-v``; the log record carries :data:`SKIPPED`).
Planners that mergekit-nan runs itself set ``_mergekit_nan_unguarded = True``;
a command that has just run the same checks itself (``mergekit-nan merge``)
merges inside :func:`suspended`, so each finding is reported once. The
wrapping itself is :func:`mergekit_nan.mergekit_compat.wrap_loaded`'s.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Tuple

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.guard_report import LOG, Guard, Reported, enforced, refusal
from mergekit_nan.errors import RecipeError
from mergekit_nan.mergekit_compat import wrap_loaded

__all__ = ["SKIPPED", "install_guard", "suspended"]

SKIPPED = "mergekit_nan_guard_skipped"
"""Attribute of the log record of skipped checks: which checks the guard skipped."""

_LOOKS_NAN = re.compile(r"merge_method\s*:\s*['\"]?nan\b|\+nan\b|\bnan_\w+\s*:")
"""What marks the text of a recipe that cannot be read as one as a NAN recipe."""


@dataclass(frozen=True)
class _State:
    """What the guard knows in the current context.

    ``suspended``: inside :func:`suspended`, the guard does nothing.
    ``reported``: inside :func:`_reporting_once`, the findings reported so far.
    ``merge``: inside a checked ``run_merge``, the check that mergekit's planner
    then completes.
    """

    suspended: bool = False
    reported: Optional[Reported] = None
    merge: Optional[_Merge] = None


_OUTSIDE = _State()
_STATE: ContextVar[_State] = ContextVar("mergekit_nan_guard", default=_OUTSIDE)


@contextlib.contextmanager
def _within(**changes: Any) -> Iterator[None]:
    """The guard's state with ``changes`` for the duration of the block."""
    token = _STATE.set(replace(_STATE.get(), **changes))
    try:
        yield
    finally:
        _STATE.reset(token)


def _skipped(what: str, error: Exception) -> None:
    """Say (with mergekit's ``-v``) which checks the guard skipped and why."""
    message = "mergekit-nan: the recipe guard skipped %s (%s: %s)"
    LOG.info(message, what, type(error).__name__, error, extra={SKIPPED: what})


def _guard(enforce: bool) -> Guard:
    """A guard for one recipe, sharing the record of what :func:`_reporting_once` reported."""
    return Guard(enforce, _STATE.get().reported)


def _options(arguments: dict) -> Any:
    """mergekit's options from a stock command's keyword arguments."""
    from mergekit.options import MergeOptions

    return MergeOptions(**{k: v for k, v in arguments.items() if k in MergeOptions.model_fields})


# -- MergePlanner._plan -----------------------------------------------------------------


def _start(planner: Any) -> Optional[Guard]:
    """Check the recipe before planning; None when the guard has nothing to say."""
    if _STATE.get().suspended or getattr(planner, "_mergekit_nan_unguarded", False):
        return None
    try:
        from mergekit_nan.doctor.recipe_walk import involves_nan

        data = planner.config.model_dump(mode="json", exclude_none=True)
        if not involves_nan(data):
            return None
        from mergekit_nan.doctor.recipe_checks import recipe_findings

        findings = recipe_findings(data)
        guard = _guard(enforced(data))
    except Exception as error:  # mergekit moved on: skip the checks rather than break it
        _skipped("the recipe's checks before planning", error)
        return None
    guard.report(findings)
    return guard


def _finish(guard: Guard, planner: Any) -> None:
    """Check the per-tensor values mergekit resolved, before anything is executed."""
    try:
        from mergekit_nan.doctor.recipe_checks import planned_findings

        findings = planned_findings(planner)
    except Exception as error:
        _skipped("the checks of the planned values", error)
        return
    guard.report(findings)


def _planned(merge: _Merge, planner: Any) -> None:
    """The per-tensor values and input shapes of the plan of a checked ``run_merge``."""
    try:
        from mergekit_nan.doctor.model_checks import shape_findings
        from mergekit_nan.doctor.plan_checks import planned_tensors
        from mergekit_nan.doctor.recipe_checks import planned_findings

        findings = planned_findings(planner)
        by_reference = {model.reference: model for model in merge.models}
        findings += shape_findings(
            planned_tensors(planner), by_reference, tokenizer_set=merge.tokenizer_set
        )
    except Exception as error:
        _skipped("the checks of the planned values and input shapes", error)
        return
    merge.guard.report(findings)


def _unplannable(error: Exception) -> RecipeError:
    """mergekit's planner refused a NAN recipe for a reason the checks did not foresee."""
    from mergekit_nan.doctor.plan_checks import readable_error

    finding = Finding(
        "error", "plan-failed", "", f"mergekit cannot plan this merge: {readable_error(error)}"
    )
    return refusal([finding])


def _guarded_plan(original: Callable) -> Callable:
    @functools.wraps(original)
    def _plan(self, *args, **kwargs):
        merge = _STATE.get().merge
        if merge is not None and not getattr(self, "_mergekit_nan_unguarded", False):
            try:
                result = original(self, *args, **kwargs)
            except Exception as error:
                if not merge.guard.enforce or isinstance(error, RecipeError):
                    raise
                raise _unplannable(error) from error
            _planned(merge, self)
            return result
        guard = _start(self)
        result = original(self, *args, **kwargs)
        if guard is not None:
            _finish(guard, self)
        return result

    return _plan


# -- run_merge ----------------------------------------------------------------------------


@dataclass
class _Merge:
    """A ``run_merge`` the guard has checked: its guard and the models it found."""

    guard: Guard
    models: Tuple[Any, ...]
    tokenizer_set: bool


def _check_merge(config: Any, out_path: str, options: Any) -> Optional[_Merge]:
    """Check a NAN recipe before ``run_merge`` (None: nothing to check)."""
    if _STATE.get().suspended:
        return None
    try:
        from mergekit_nan.doctor.recipe_walk import involves_nan

        data = config.model_dump(mode="json", exclude_none=True)
        if not involves_nan(data):
            return None
        from mergekit_nan.doctor.check import check_recipe

        report = check_recipe(
            data, out_path=str(out_path), options=options, downloads=True, plan=False
        )
        tokenizer_set = config.tokenizer_source is not None or config.tokenizer is not None
        merge = _Merge(_guard(enforced(data)), report.models, tokenizer_set)
    except Exception as error:
        _skipped("the recipe's checks before the merge", error)
        return None
    merge.guard.report(report.findings)
    return merge


def _guarded_run_merge(original: Callable) -> Callable:
    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, *args, **kwargs):
        with _reporting_once():
            merge = _check_merge(merge_config, out_path, options)
            if merge is None:
                return original(merge_config, out_path, options, *args, **kwargs)
            existed = os.path.lexists(out_path)
            try:
                with _within(merge=merge):  # mergekit's own plan is checked as it is made
                    return original(merge_config, out_path, options, *args, **kwargs)
            except BaseException as error:
                _remove_unfinished(out_path, existed, error)
                raise

    return run_merge


def _remove_unfinished(out_path: str, existed: bool, error: BaseException) -> None:
    """Remove the output directory a failed merge created; say so in a plugin error."""
    if existed or not os.path.isdir(out_path):
        return
    shutil.rmtree(out_path, ignore_errors=True)
    if isinstance(error, RecipeError):
        error.message = f"the unfinished output directory {out_path} was removed: {error.message}"


@contextlib.contextmanager
def _reporting_once() -> Iterator[None]:
    """Within this block every guard shares one record of what it has reported."""
    if _STATE.get().reported is not None:
        yield
        return
    with _within(reported=set()):
        yield


# -- the command lines ----------------------------------------------------------------------


def _readable_documents(path: str, multi: bool) -> Optional[list]:
    """The YAML documents of a NAN recipe file, or a RecipeError saying why they are not one.

    None for a file that does not look like a NAN recipe (mergekit reports its
    own errors then) or cannot be read at all.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):
        return None
    if not _LOOKS_NAN.search(text):
        return None
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_nan.doctor.plan_checks import readable_error
    from mergekit_nan.recipe import parse_recipe

    try:
        documents = list(parse_recipe(path, text).documents)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {readable_error(error)}") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise RecipeError(f"{path} is not a mergekit recipe (expected YAML mappings)")
    if len(documents) > 1 and not multi:
        raise RecipeError(f"{path} holds {len(documents)} recipes; run it with mergekit-multi")
    for document in documents:
        try:
            MergeConfiguration.model_validate({k: v for k, v in document.items() if k != "name"})
        except Exception as error:
            name = f" (stage {document['name']})" if multi and document.get("name") else ""
            raise RecipeError(
                f"{path}{name} is not a valid mergekit recipe: {readable_error(error)}"
            ) from None
    return documents


def _guarded_yaml_command(original: Callable) -> Callable:
    @functools.wraps(original)
    def command(*args, **kwargs):
        if not _STATE.get().suspended and kwargs.get("config_file"):
            _readable_documents(str(kwargs["config_file"]), multi=False)
        return original(*args, **kwargs)

    return command


def _guarded_multi_command(original: Callable) -> Callable:
    @functools.wraps(original)
    def command(*args, **kwargs):
        config_file, out_path = kwargs.get("config_file"), kwargs.get("out_path")
        documents = None
        if not _STATE.get().suspended and config_file:
            documents = _readable_documents(str(config_file), multi=True)
        if documents is None:
            return original(*args, **kwargs)
        with _reporting_once():
            _check_stages(str(config_file), documents, out_path, kwargs)
            return original(*args, **kwargs)

    return command


def _check_stages(config_file: str, documents: list, out_path: Optional[str], arguments) -> None:
    """All stages of a ``mergekit-multi`` file and all its output directories, up front."""
    from mergekit_nan.doctor.check import check_recipe
    from mergekit_nan.doctor.outputs import output_findings

    intermediate = str(arguments.get("intermediate_dir") or "")
    names = [str(d["name"]) for d in documents if d.get("name") is not None]
    stages = [(name, os.path.join(intermediate, name)) for name in names]
    try:
        options = _options(arguments)
        report = check_recipe(
            config_file,
            out_path=out_path,
            options=options,
            downloads=True,
            stage_outputs=stages,
        )
        findings = list(report.findings)
        for index, (_, path) in enumerate(stages):
            others = stages[:index] + stages[index + 1 :]
            # A stage output that exists already is skipped by mergekit-multi (--lazy).
            found = output_findings(
                documents, path, cache_dir=options.transformers_cache, stage_outputs=others
            )
            findings.extend(f for f in found if f.code == "output-overwrites-input")
    except Exception as error:
        _skipped("the checks of mergekit-multi's stages", error)
        return
    _guard(any(enforced(d) for d in documents)).report(findings)


# -- installing ----------------------------------------------------------------------------


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No guard inside this block: for callers that have just run the same checks."""
    with _within(suspended=True):
        yield


def install_guard() -> None:
    """Put the guard on every mergekit module above that is loaded; idempotent."""
    wrap_loaded(
        plan=_guarded_plan,
        run_merge=_guarded_run_merge,
        yaml_command=_guarded_yaml_command,
        multi_command=_guarded_multi_command,
    )
