"""``mergekit-nan compare --task``: lm-evaluation-harness tasks, planned and scored.

lm-eval is imported here only, and only when ``--task`` is given (the optional
``tasks`` extra).

* :func:`plan_tasks` (before any merge) resolves every ``--task``: a task YAML
  path; else a name in ``--include-path``; else a name in lm-eval's own
  registry (indexed only then: it takes seconds). It builds each task once,
  which loads its data, so missing data files and a dataset that cannot be
  reached offline are found here; it keeps ``--limit`` documents of each task
  (a seeded sample, as ``--max-documents`` keeps lines) and reads the metrics:
  the deciding one (``--metric``, else the task's first metric whose
  aggregation is the mean over documents) and the others.
* :func:`score_tasks` wraps the model compare already holds in lm-eval's
  ``HFLM`` (no reload, no copy, on its device) and runs lm-eval's
  ``simple_evaluate`` on the planned task objects and documents, with logged
  samples: each document's value of the deciding metric comes from them, each
  metric's aggregate (and each group's) from lm-eval's results.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "EXTRA",
    "PlannedTask",
    "TaskMetric",
    "TaskPlan",
    "TaskScores",
    "TaskSettings",
    "plan_tasks",
    "score_tasks",
]

EXTRA = "pip install 'mergekit-nan[tasks]'"
"""How to install lm-eval for ``--task``."""

_LOCALLY = (
    "give it locally: a task YAML with dataset_path: json and dataset_kwargs: "
    "{data_files: {test: FILE.jsonl}} (--task PATH.yaml or --include-path DIR)"
)


@dataclass(frozen=True)
class TaskSettings:
    """The ``--task`` options as given."""

    names: Tuple[str, ...] = ()
    include_path: Optional[str] = None
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    apply_chat_template: bool = False
    gen_kwargs: Optional[str] = None
    metric: Optional[str] = None
    batch_size: int = 8


@dataclass(frozen=True)
class TaskMetric:
    """One metric of a task under one of its filters.

    ``name`` is the metric (``acc``), with ``,FILTER`` appended when the filter
    is not lm-eval's ``none`` (``exact_match,strict-match``); ``mean``: its
    aggregation is the mean over documents.
    """

    name: str
    key: str
    filter: str
    higher_is_better: bool
    mean: bool


@dataclass(frozen=True)
class PlannedTask:
    """A task to score: its documents (ids in its evaluation split) and metrics."""

    name: str
    metric: TaskMetric
    others: Tuple[TaskMetric, ...]
    documents: Tuple[int, ...]
    total: int
    group: Optional[str] = None


@dataclass(frozen=True)
class TaskPlan:
    """Every task resolved, built and checked; lm-eval's objects kept for scoring."""

    settings: TaskSettings
    tasks: Tuple[PlannedTask, ...]
    groups: Tuple[str, ...]
    objects: Tuple[Any, ...] = field(repr=False, compare=False, default=())
    manager: Any = field(repr=False, compare=False, default=None)
    gen_kwargs: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class TaskScores:
    """One candidate's results: per task the deciding metric's value of each planned
    document (float64) and every metric's aggregate; per group lm-eval's aggregates."""

    values: Tuple[torch.Tensor, ...]
    aggregates: Tuple[Dict[str, float], ...]
    groups: Dict[str, Dict[str, float]]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            f"--task needs lm-evaluation-harness, which is not installed: {EXTRA}"
        ) from None
    return lm_eval, TaskManager


def _is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name


def _manager(names: Sequence[str], include_path: Optional[str]):
    """A TaskManager that knows every name: lm-eval's own registry only when needed."""
    _, TaskManager = _lm_eval()
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"--include-path {include_path} is not a directory")
    local = TaskManager(include_path=include_path, include_defaults=False)
    for name in names:
        if _is_path(name) and not os.path.isfile(name):
            raise ValueError(f"--task {name}: no such task file")
    unknown = [n for n in names if not _is_path(n) and n not in local.all_tasks]
    if not unknown:
        return local
    manager = TaskManager(include_path=include_path, include_defaults=True)
    for name in unknown:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f" (nearest: {', '.join(near)})" if near else ""
            raise ValueError(f"--task {name}: lm-eval knows no task or group of that name{hint}")
    return manager


def _load(manager, name: str) -> Dict[str, Any]:
    """lm-eval's ``load`` of one name, its data errors as one sentence."""
    try:
        return manager.load([name])
    except FileNotFoundError as error:
        raise ValueError(f"--task {name}: its data files are missing ({error})") from None
    except ConnectionError as error:
        raise ValueError(
            f"--task {name}: its dataset cannot be reached offline ({error}); download it "
            f"once with network access, or {_LOCALLY}"
        ) from None
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise ValueError(f"--task {name}: lm-eval cannot build it ({error})") from None


def _metrics(task) -> List[TaskMetric]:
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation()
    higher = task.higher_is_better()
    filters = [f.name for f in getattr(task, "_filters", ())] or ["none"]
    found = []
    for filter_name in filters:
        for key, function in aggregation.items():
            name = key if filter_name == "none" else f"{key},{filter_name}"
            found.append(
                TaskMetric(name, key, filter_name, bool(higher.get(key, True)), function is mean)
            )
    return found


def _deciding(name: str, metrics: Sequence[TaskMetric], wanted: Optional[str]) -> TaskMetric:
    if wanted is None:
        means = [m for m in metrics if m.mean]
        if not means:
            raise ValueError(
                f"--task {name}: none of its metrics ({', '.join(m.name for m in metrics)}) "
                "is a mean over documents, which compare needs for paired intervals"
            )
        return means[0]
    matches = [m for m in metrics if m.name == wanted] or [m for m in metrics if m.key == wanted]
    if not matches:
        raise ValueError(
            f"--metric {wanted}: task {name} has no such metric "
            f"(it has {', '.join(m.name for m in metrics)})"
        )
    if not matches[0].mean:
        raise ValueError(
            f"--metric {wanted}: task {name} aggregates it over all documents at once, not as a "
            "mean over documents, so it has no paired interval to decide by (compare shows it "
            "without one)"
        )
    return matches[0]


def _documents(total: int, limit: Optional[int], seed: int) -> Tuple[int, ...]:
    if limit is None or limit >= total:
        return tuple(range(total))
    return tuple(sorted(random.Random(seed).sample(range(total), limit)))


def _gen_kwargs(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if not text:
        return None
    from lm_eval.utils import simple_parse_args_string

    try:
        parsed = simple_parse_args_string(text)
    except (ValueError, IndexError):
        parsed = None
    if not parsed:
        raise ValueError(f"--gen-kwargs {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
    return parsed


def plan_tasks(settings: TaskSettings, *, seed: int) -> TaskPlan:
    """Resolve, build and check every task (see the module docstring)."""
    manager = _manager(settings.names, settings.include_path)
    gen_kwargs = _gen_kwargs(settings.gen_kwargs)
    objects, planned, groups = [], [], []
    for name in settings.names:
        loaded = _load(manager, name)
        children = {c for names in loaded.get("group_map", {}).values() for c in names}
        objects += [g for g in loaded.get("groups", {}).values() if g.name not in children]
        objects += [t for n, t in loaded["tasks"].items() if n not in children]
        parents = {c: g for g, names in loaded.get("group_map", {}).items() for c in names}
        groups += [g for g in loaded.get("groups", {}) if g not in groups]
        for task_name, task in loaded["tasks"].items():
            if any(p.name == task_name for p in planned):
                raise ValueError(f"--task {name}: task {task_name} is given twice")
            metrics = _metrics(task)
            metric = _deciding(task_name, metrics, settings.metric)
            total = len(task.eval_docs)
            if total == 0:
                raise ValueError(f"--task {name}: task {task_name} has no documents")
            planned.append(
                PlannedTask(
                    task_name,
                    metric,
                    tuple(m for m in metrics if m != metric),
                    _documents(total, settings.limit, seed),
                    total,
                    parents.get(task_name),
                )
            )
    return TaskPlan(settings, tuple(planned), tuple(groups), tuple(objects), manager, gen_kwargs)


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _aggregates(results: Dict[str, Any], metrics: Sequence[TaskMetric]) -> Dict[str, float]:
    found = {}
    for metric in metrics:
        value = _number(results.get(f"{metric.key},{metric.filter}"))
        if value is not None:
            found[metric.name] = value
    return found


def _group_aggregates(results: Dict[str, Any]) -> Dict[str, float]:
    found = {}
    for key, value in results.items():
        if "," not in key or "_stderr" in key or _number(value) is None:
            continue
        metric, filter_name = key.split(",", 1)
        found[metric if filter_name == "none" else key] = float(value)
    return found


def _configure(plan: TaskPlan, tasks: Sequence[Any]) -> None:
    """lm-eval's own overrides, as ``simple_evaluate`` applies them to each task (the
    few-shot seed again for each candidate, so all see the same examples)."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    for task in tasks:
        if task.get_config("output_type") == "generate_until" and plan.gen_kwargs:
            task.set_config(key="generation_kwargs", value=plan.gen_kwargs, update=True)
        fewshot = plan.settings.num_fewshot
        if fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


def score_tasks(
    model, tokenizer, plan: TaskPlan, *, quiet: bool = False, verbose: bool = False
) -> TaskScores:
    """Every planned task on ``model`` (already loaded) through lm-eval's ``HFLM``.

    lm-eval's ``evaluate`` on the planned task objects, configured as
    ``simple_evaluate`` configures them (few-shot count and seed, generation
    settings), without its environment report.
    """
    _lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.settings.batch_size)
        if quiet:
            for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
        task_dict = plan.manager.load(list(plan.objects))
        _configure(plan, list(task_dict["tasks"].values()))
        out = evaluate(
            lm=lm,
            task_dict=task_dict,
            samples={t.name: list(t.documents) for t in plan.tasks},
            bootstrap_iters=0,
            log_samples=True,
            apply_chat_template=plan.settings.apply_chat_template,
            fewshot_as_multiturn=plan.settings.apply_chat_template,
        )
    finally:
        logger.setLevel(level)
    values, aggregates = [], []
    for task in plan.tasks:
        by_document = {
            int(s["doc_id"]): float(s[task.metric.key])
            for s in out["samples"][task.name]
            if s.get("filter", "none") == task.metric.filter
        }
        values.append(torch.tensor([by_document[d] for d in task.documents], dtype=torch.float64))
        aggregates.append(_aggregates(out["results"][task.name], (task.metric, *task.others)))
    groups = {g: _group_aggregates(out["results"].get(g, {})) for g in plan.groups}
    return TaskScores(tuple(values), tuple(aggregates), groups)
