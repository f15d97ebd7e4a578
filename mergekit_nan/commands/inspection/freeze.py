"""Freeze NAN coefficients into a stock mergekit recipe that needs no plugin.

The frozen recipe is the recipe as mergekit normalises it (``slices`` with
explicit layer ranges, or ``modules``), with the method replaced by a stock
one whose ``weight`` values are the inspected coefficients:

* ``<method>+nan`` becomes ``<method>`` with the same parameters, minus
  ``nan_exponent``/``nan_norm``, and ``weight`` = the NAN weights;
* ``nan`` with a base becomes ``task_arithmetic`` (``normalize: false``, same
  ``lambda``): base + lambda * sum_i alpha_i (theta_i - base) is exactly the
  ``nan`` update;
* ``nan`` without a base becomes ``linear`` (``normalize: false``) with
  weights alpha_i: sum_i alpha_i theta_i.

Weights go into each source's ``parameters`` (the highest precedence). A
model whose weight is the same for every tensor gets a number (``model``
granularity); otherwise (``tensor`` and ``layer`` granularity) a list of
conditional settings, one per input tensor, with full tensor names as
filters. mergekit matches a filter as a substring and takes the first match,
so filters are ordered longest first: a filter that matches a longer name
comes before it can shadow anything, and each tensor meets its own name
before any shorter one. Every setting is checked with mergekit's own
``evaluate_setting`` before the recipe is returned.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import yaml
from mergekit.common import ModelReference
from mergekit.config import ConfigYamlDumper, MergeConfiguration, evaluate_setting

from mergekit_nan.commands.inspection.coefficient_pass import Inspection

__all__ = ["NAN_PARAMETERS", "freeze_recipe", "frozen_yaml"]

NAN_PARAMETERS = ("nan_exponent", "nan_norm", "nan_granularity")
"""Parameters only the plugin understands; never present in a frozen recipe."""

_Key = Tuple[str, int, ModelReference]


def _kept(parameters: Optional[Dict[str, Any]], keep) -> Optional[Dict[str, Any]]:
    if not parameters:
        return None
    kept = {name: value for name, value in parameters.items() if keep(name)}
    return kept or None


def _setting(name_values: List[Tuple[str, float]], fallback: bool) -> Any:
    """A number when all values agree, else longest-first filters (+ a fallback)."""
    values: Dict[str, float] = {}
    for name, value in name_values:
        if values.setdefault(name, value) != value:
            raise ValueError(
                f"input tensor {name!r} feeds two output tensors with different "
                "NAN weights in one slice; a filter cannot tell them apart"
            )
    distinct = set(values.values())
    if len(distinct) == 1:
        return next(iter(distinct))
    ordered = sorted(values.items(), key=lambda item: -len(item[0]))
    setting: List[Dict[str, Any]] = [{"filter": n, "value": v} for n, v in ordered]
    if fallback:
        # Only tensors the merge copies without NAN can reach this entry.
        setting.append({"value": 1.0})
    return setting


def _strip(data: Dict[str, Any], keep) -> None:
    """Apply ``keep`` to the parameters of every scope of a dumped configuration."""
    scopes = [data]
    for module in (data.get("modules") or {}).values():
        scopes.append(module)
        for output_slice in module.get("slices") or ():
            scopes.append(output_slice)
            scopes.extend(output_slice["sources"])
    for scope in scopes:
        kept = _kept(scope.get("parameters"), keep)
        if kept is None:
            scope.pop("parameters", None)
        else:
            scope["parameters"] = kept


def _check(frozen: Dict[str, Any], inspection: Inspection) -> None:
    """Resolve every tensor's weight from the frozen recipe as mergekit would."""
    config = MergeConfiguration.model_validate(_as_modules(frozen, inspection))
    for tensor in inspection.tensors:
        output_slice = config.modules[tensor.module].slices[tensor.slice_index]
        for model, name, weight in zip(tensor.models, tensor.inputs, tensor.weights):
            source = next(s for s in output_slice.sources if s.model == model)
            got = evaluate_setting(name, source.parameters["weight"], validate=float)
            if got != weight:
                raise AssertionError(
                    f"frozen weight of {model} for {name!r} resolves to {got}, not {weight}"
                )


def _as_modules(frozen: Dict[str, Any], inspection: Inspection) -> Dict[str, Any]:
    if "modules" in frozen:
        return frozen
    (module,) = {t.module for t in inspection.tensors} or {"default"}
    rest = {k: v for k, v in frozen.items() if k != "slices"}
    return {**rest, "modules": {module: {"slices": frozen["slices"]}}}


def freeze_recipe(inspection: Inspection) -> Dict[str, Any]:
    """The stock recipe (a YAML-ready dict) reproducing ``inspection``'s merge."""
    composite = inspection.merge_method.endswith("+nan")
    config: MergeConfiguration = inspection.config
    data = config.model_dump(mode="json", exclude_none=True)
    if composite:
        _strip(data, lambda name: name not in NAN_PARAMETERS + ("weight",))
    else:
        has_base = inspection.inner_method == "task_arithmetic"
        _strip(data, lambda name: has_base and name == "lambda")
        data["parameters"] = {**(data.get("parameters") or {}), "normalize": False}
    data["merge_method"] = inspection.inner_method

    found: Dict[_Key, List[Tuple[str, float]]] = defaultdict(list)
    for tensor in inspection.tensors:
        for model, name, weight in zip(tensor.models, tensor.inputs, tensor.weights):
            found[(tensor.module, tensor.slice_index, model)].append((name, weight))
    fallback = bool(inspection.skipped)
    for module_name, module in (config.modules or {}).items():
        for index, output_slice in enumerate(module.slices or ()):
            dumped = data["modules"][module_name]["slices"][index]["sources"]
            for source, source_data in zip(output_slice.sources, dumped):
                entries = found.get((module_name, index, source.model))
                if entries:
                    parameters = source_data.setdefault("parameters", {})
                    parameters["weight"] = _setting(entries, fallback)

    modules = data.pop("modules")
    if len(modules) == 1 and set(next(iter(modules.values()))) == {"slices"}:
        body = {"slices": next(iter(modules.values()))["slices"]}
    else:
        body = {"modules": modules}
    head = {k: data.pop(k) for k in ("merge_method", "base_model") if k in data}
    frozen = {**head, **data, **body}
    _check(frozen, inspection)
    return frozen


def frozen_yaml(frozen: Dict[str, Any], *, source: str, inspection: Inspection) -> str:
    """YAML text of ``frozen`` with a header saying where the weights came from."""
    header = (
        f"# Stock mergekit recipe: the NAN coefficients of {source} "
        f"({inspection.merge_method}, {inspection.granularity} granularity)\n"
        f"# frozen into {inspection.inner_method} weight values by mergekit-nan.\n"
    )
    return header + yaml.dump(frozen, Dumper=ConfigYamlDumper, sort_keys=False)
