"""Parameter-level findings of ``mergekit-nan check`` and the stock-command guard.

Nothing here reads a file or a tensor. :func:`recipe_findings` reads the
recipe alone; :func:`planned_findings` reads the per-tensor parameters that
mergekit's planner resolved (filters and gradients applied), before any
tensor is loaded.

Division of labour (the two never report the same problem, so their findings
can simply be concatenated):

* :func:`recipe_findings` checks every value written in the recipe on its
  own (a plain value, each point of a gradient, the value of each filter):
  unknown or misplaced parameters, ``nan_*`` keys on a method that ignores
  them, non-finite, invalid or overflowing values, negative weights,
  ``nan_norm: delta`` on a base-ignoring method, ``nan_granularity``. It also
  checks values together (a group's weight total, weights on some models
  only, all-zero priors, ``nan_norm: delta`` where a group has no base) when
  every setting of the parameters involved is a plain value.
* :func:`planned_findings` checks values together, on the values resolved for
  each tensor, only for parameters that have a filter or a gradient somewhere
  in the recipe. One finding per problem and group of models: ``where`` is
  the parameter's name, ``tensor`` the first tensor concerned, and the
  message says how many tensors are.

Recipe findings have ``where`` = the path as written, e.g.
``models[1].parameters.nan_exponet``; group findings name the group
(``models``, ``slices[0].sources``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mergekit import merge_methods
from mergekit.merge_methods.base import BasePolicy, MergeMethod, ParameterScope, ParameterSpec
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.recipe_limits import Limit, Problem, dtype_limit, number
from mergekit_nan.doctor.recipe_names import (
    NAN_PREFIX,
    forgotten_nan,
    granularity_findings,
    ignored_parameter,
    reads_nan,
    unknown_method,
    unknown_parameter,
)
from mergekit_nan.doctor.recipe_values import (
    WeightRule,
    value_problems,
    weight_problems,
    weight_rule,
)
from mergekit_nan.doctor.recipe_walk import (
    Group,
    Scope,
    groups,
    involves_nan,
    resolve_plain,
    scalars,
    scopes,
    varying_parameters,
)
from mergekit_nan.mergekit_compat import planned_tasks
from mergekit_nan.parameters import NAN_GRANULARITY, NAN_NORM
from mergekit_nan.registration import register_methods

if TYPE_CHECKING:
    from mergekit.plan import MergePlanner

__all__ = ["involves_nan", "planned_findings", "recipe_findings"]


def _method(data: Mapping[str, Any]) -> Optional[MergeMethod]:
    """The recipe's merge method, None when it names none that is registered."""
    register_methods()
    name = data.get("merge_method")
    if not isinstance(name, str):
        return None
    try:
        return merge_methods.get(name)
    except RuntimeError:
        return None


def _ignores_base(method: MergeMethod) -> bool:
    return method.spec.contract.base == BasePolicy.IGNORED


def _delta_on_ignoring(method: MergeMethod, where: str) -> Finding:
    inner = getattr(method, "inner", method).spec.name
    return Finding(
        "error",
        "delta-without-base",
        where,
        f"{inner} ignores the base model, so nan_norm: delta (task vectors "
        f"theta_i - theta_base) is undefined on {method.spec.name}: the merge would fail",
        "use nan_norm: weights (or auto), or a base-aware method such as task_arithmetic+nan",
    )


def _setting_findings(
    method: MergeMethod,
    specs: Mapping[str, ParameterSpec],
    scope: Scope,
    name: str,
    setting: Any,
    *,
    rule: Optional[WeightRule],
    normalising: bool,
    limit: Optional[Limit],
) -> List[Finding]:
    """Findings for one parameter setting, value by value."""
    where = f"{scope.where}.{name}"
    if name.startswith(NAN_PREFIX) and not reads_nan(method):
        return [forgotten_nan(method, name, where)]
    spec = specs.get(name)
    if spec is None:
        return [unknown_parameter(method, name, where)]
    if name == NAN_GRANULARITY.name:
        return granularity_findings(scope, setting, where)
    if spec.scope == ParameterScope.SHARED and scope.kind == "model":
        return [ignored_parameter(method, name, where, scope.model)]
    findings = []
    for scalar in scalars(where, setting):
        if name == NAN_NORM.name and scalar.value == "delta" and _ignores_base(method):
            findings.append(_delta_on_ignoring(method, scalar.where))
            continue
        problems = value_problems(
            spec,
            scalar.value,
            model=scope.model,
            rule=rule,
            normalising=normalising,
            limit=limit,
        )
        findings.extend(problem.at(scalar.where) for problem in problems)
    return findings


def _switch_value(rule: WeightRule, method: MergeMethod, sources: Sequence[Scope]) -> Any:
    """The normalisation switch as the given scopes set it (plain values), else its default."""
    if rule.switch is None:
        return None
    spec = next(p for p in method.spec.parameters if p.name == rule.switch)
    found, value = resolve_plain(rule.switch, [scope.parameters for scope in sources])
    try:
        return spec.validate(value if found else spec.default)
    except Exception:  # noqa: BLE001 - an invalid switch is reported value by value
        return None


def _group_weights(
    group: Group, rule: WeightRule, default: Any
) -> Optional[List[Tuple[str, Optional[float]]]]:
    """The group's weights as plain values resolve them; None if one is not a number."""
    shared = [scope.parameters for scope in group.shared]
    weights = []
    for member in group.members:
        if rule.scope == ParameterScope.NON_BASE and member.model == group.base:
            continue
        found, value = resolve_plain("weight", [member.parameters or {}] + shared)
        if not found:
            weights.append((member.model, default))
            continue
        parsed = number(value)
        if parsed is None:
            return None
        weights.append((member.model, parsed))
    return weights


def _combined_findings(
    data: Mapping[str, Any],
    method: MergeMethod,
    rule: Optional[WeightRule],
    limit: Optional[Limit],
) -> Iterator[Finding]:
    """Checks of values together, for parameters set by plain values only."""
    varying = varying_parameters(data)
    if rule is not None and not {"weight", rule.switch} & varying:
        spec = next(p for p in method.spec.parameters if p.name == "weight")
        default = None if spec.required else spec.default
        for group in groups(data):
            weights = _group_weights(group, rule, default)
            if weights is None:
                continue
            normalising = rule.normalising(_switch_value(rule, method, group.shared))
            for problem in weight_problems(rule, weights, normalising=normalising, limit=limit):
                yield problem.at(group.where)
    if NAN_NORM.name in varying or _ignores_base(method):
        return
    if not any(p.name == NAN_NORM.name for p in method.spec.parameters):
        return
    baseless: Dict[str, List[str]] = {}
    for group in groups(data):
        for scope in group.shared:
            value = scope.parameters.get(NAN_NORM.name)
            if value is not None:
                if value == "delta" and group.base is None:
                    models = ", ".join(member.model for member in group.members)
                    place = f"{group.where} ({models})"
                    baseless.setdefault(f"{scope.where}.{NAN_NORM.name}", []).append(place)
                break
    for where, places in baseless.items():
        yield _delta_without_base(places).at(where)


def _delta_without_base(places: Sequence[str]) -> Problem:
    return Problem(
        "error",
        "delta-without-base",
        "nan_norm: delta needs a base model (it takes task vectors theta_i - theta_base), "
        f"but there is none for {'; '.join(places)}: the merge would fail",
        "set base_model (for the recipe or the slice), or use nan_norm: weights (or auto)",
    )


def recipe_findings(data: Mapping[str, Any]) -> List[Finding]:
    """Findings from the recipe alone (one YAML document as a mapping, as written by the user
    or as MergeConfiguration.model_dump(mode="json", exclude_none=True) gives it). Reads no files.
    """
    method = _method(data)
    if method is None:
        return [unknown_method(data.get("merge_method"))]
    specs = {p.name: p for p in method.spec.parameters}
    rule = weight_rule(method)
    limit = dtype_limit(data.get("dtype"), data.get("out_dtype"))
    top = next(scopes(data))
    normalising = rule is not None and rule.normalising(_switch_value(rule, method, [top]))
    findings: List[Finding] = []
    for scope in scopes(data):
        for name, setting in scope.parameters.items():
            findings.extend(
                _setting_findings(
                    method,
                    specs,
                    scope,
                    str(name),
                    setting,
                    rule=rule,
                    normalising=normalising,
                    limit=limit,
                )
            )
    findings.extend(_combined_findings(data, method, rule, limit))
    findings.extend(_count_findings(data, method))
    return findings


def _count_findings(data: Mapping[str, Any], method: MergeMethod) -> Iterator[Finding]:
    """``too-few-models``: a group with fewer models than the method's contract needs."""
    contract = method.spec.contract
    for group in groups(data):
        implicit = [m for m in group.members if m.where == "base_model"]
        inputs = [
            m for m in group.members if not (implicit and m in implicit and _ignores_base(method))
        ]
        has_base = group.base is not None and not _ignores_base(method)
        count = len({m.model for m in inputs})
        non_base = count - int(has_base and group.base in {m.model for m in inputs})
        if count >= contract.min_inputs and non_base >= (contract.min_non_base or 0):
            continue
        names = ", ".join(m.model for m in inputs) or "none"
        besides = ""
        if non_base < (contract.min_non_base or 0):
            besides = f" and at least {contract.min_non_base} besides the base model"
        yield Finding(
            "error",
            "too-few-models",
            group.where,
            f"{method.spec.name} merges at least {contract.min_inputs} models{besides}, but "
            f"{group.where} gives {count} ({names}): mergekit would refuse the merge",
            "list the models to merge (a base model and one fine-tune, or two fine-tunes)",
        )


def _tensor_problems(
    task: ExecuteMergeMethodTask, varying: set, limit: Optional[Limit]
) -> Iterator[Tuple[Tuple[Any, ...], Problem]]:
    """Problems of one planned tensor's resolved values, each with a grouping key."""
    method = merge_methods.get(task.method_name)
    rule = weight_rule(method)
    if rule is not None and {"weight", rule.switch} & varying:
        inputs = [
            model
            for model in task.model_order
            if rule.scope == ParameterScope.INPUT or model != task.base_model
        ]
        weights = [(str(model), task.input_parameters[model].get("weight")) for model in inputs]
        switch = task.parameters.get(rule.switch) if rule.switch else None
        normalising = rule.normalising(switch)
        for problem in weight_problems(rule, weights, normalising=normalising, limit=limit):
            yield ("weight", problem.code, tuple(model for model, _ in weights)), problem
    if (
        NAN_NORM.name in varying
        and not _ignores_base(method)
        and task.parameters.get(NAN_NORM.name) == "delta"
        and task.base_model is None
    ):
        yield (
            (NAN_NORM.name, "delta"),
            _delta_without_base([", ".join(str(model) for model in task.model_order)]),
        )


def planned_findings(planner: MergePlanner) -> List[Finding]:
    """Findings from the resolved per-tensor parameters of a planner on which `_plan()` has run
    (its planned tasks: (WeightInfo, ExecuteMergeMethodTask) pairs; each task has method_name,
    parameters (shared, resolved), input_parameters (per model, resolved), base_model,
    model_order, output_weight, and the config's dtype/out_dtype). Reads no tensor data.
    """
    register_methods()
    config = planner.config
    varying = varying_parameters(config.model_dump(mode="json", exclude_none=True))
    limit = dtype_limit(config.dtype, config.out_dtype)
    planned = [
        task for _, task in planned_tasks(planner) if isinstance(task, ExecuteMergeMethodTask)
    ]
    seen: Dict[Tuple[Any, ...], List[Any]] = {}
    for task in planned:
        for key, problem in _tensor_problems(task, varying, limit):
            entry = seen.setdefault(key, [problem, task.output_weight.name, 0])
            entry[2] += 1
    return [
        Finding(
            problem.level,
            problem.code,
            key[0],
            f"{problem.message} (resolved per tensor: {count} of {len(planned)} tensors, "
            f"first {tensor})",
            problem.fix,
            tensor,
        )
        for key, (problem, tensor, count) in seen.items()
    ]
