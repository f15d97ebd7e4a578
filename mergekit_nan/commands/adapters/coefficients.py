"""NAN coefficients of an adapter recipe, from the LoRA factors alone.

An adapter recipe (:mod:`mergekit_nan.doctor.adapters`) means the recipe with
every adapter ``A_i`` replaced by the model ``base+A_i``. Over those inputs, the
task vector of a LoRA module is ``delta_i = s_i B_i A_i`` (zero where an adapter
leaves the module alone) and that of a ``modules_to_save`` tensor is
``theta_i - theta_base``. This module computes, per base tensor, what the merge
of those inputs would compute, without forming any ``m x n`` product:

* the norms ``||delta_i||_F`` and element sums from the factors
  (:func:`mergekit_nan.lora.factor_norm`, :func:`~mergekit_nan.lora.factor_sum`),
  and for full tensors from the norm pass (:func:`mergekit_nan.norms.norms_and_sums`);
* the recipe's parameters per tensor through the method's own specs, resolved
  as mergekit's planner resolves them (:func:`mergekit.parameter_resolver.resolve_parameter`);
* NAN's reading from those norms by the core that weighs full models
  (:func:`mergekit_nan.weighting.norm_weighting`: formula, priors, scale and
  their checks), pooled at ``layer``/``model`` granularity by
  :func:`mergekit_nan.granularity.pooled_weightings` exactly as for full models;
* the multiplier ``c_i`` of each ``delta_i`` in the merged update
  ``theta_base + sum_i c_i delta_i``: for ``nan`` the core's ``lambda * alpha_i``
  (:meth:`~mergekit_nan.weighting.Weighting.update_coefficients`, 0 for a zero
  update); for ``task_arithmetic`` and ``task_arithmetic+nan``
  ``lambda * w_i / (sum_j w_j if normalize else 1)``, with NAN's weights
  ``w_i = share_i * (sum of the given weights, else 1)`` for the composite.

Only these methods are a weighted sum of the updates, which is what keeps the
result a LoRA adapter. ``linear`` ignores ``base_model`` (mergekit adds the base
as one more weighted input and NAN would weigh whole tensors), ``nan_norm:
weights`` weighs the whole tensors too, and the sparsifying methods (TIES, DARE,
DELLA, ...) act on the elements of each dense update: those are refused with a
message that points to ``--full-model``. Gradient settings are refused too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.config import (
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputModuleDefinition,
    OutputSliceDefinition,
)
from mergekit.merge_methods.base import ParameterSpec
from mergekit.parameter_resolver import resolve_parameter

from mergekit_nan.commands.inspection.coefficient_pass import Inspection, TensorCoefficients
from mergekit_nan.doctor.adapters import FULL_MODEL_HINT, AdapterError, AdapterRecipe, factor_method
from mergekit_nan.granularity import pooled_weightings
from mergekit_nan.lora import factor_norm, factor_sum
from mergekit_nan.method import NanMerge
from mergekit_nan.modifier import NanCoefficients
from mergekit_nan.norms import norms_and_sums
from mergekit_nan.parameters import NAN_EXPONENT, NAN_NORM, Granularity, optional
from mergekit_nan.registration import is_nan_method
from mergekit_nan.weighting import (
    Weighting,
    check_scale,
    norm_weighting,
    weight_total,
    without_zero_updates,
)

__all__ = [
    "TensorUpdate",
    "adapter_inspection",
    "adapter_updates",
    "base_adapter_config",
]


@dataclass(frozen=True)
class TensorUpdate:
    """One base tensor of an adapter merge: the update ``sum_i coefficients[i] * delta_i``.

    ``weighting`` is NAN's reading (None for plain ``task_arithmetic``);
    ``norms`` and ``sums`` are ``||delta_i||_F`` and ``sum(delta_i)`` per adapter;
    ``lora`` says whether the deltas are LoRA factors (else full tensors).
    """

    name: str
    layer: Optional[Tuple[str, int]]
    lora: bool
    norms: Tuple[float, ...]
    sums: Tuple[float, ...]
    numel: int
    weighting: Optional[Weighting]
    coefficients: Tuple[float, ...]


def _is_gradient(setting: Any) -> bool:
    return isinstance(setting, list) and all(
        isinstance(v, (int, float, bool, str)) for v in setting
    )


def _resolved(
    config: MergeConfiguration,
    spec: ParameterSpec,
    tensor: str,
    model: Optional[InputModelDefinition] = None,
) -> Any:
    """``spec``'s value for ``tensor`` (the model's own, else the top-level one), as mergekit's
    planner resolves and validates it for the recipe over ``base+adapter`` models.

    A gradient (which needs the layer's place in a slice) is refused.
    """
    scopes = ([model.parameters] if model is not None else []) + [config.parameters]
    for scope in scopes:
        setting = (scope or {}).get(spec.name)
        if _is_gradient(setting):
            raise AdapterError(
                f"parameter {spec.name} is a gradient, which an adapter recipe does not "
                "support; give one value, or filters"
            )
        if setting is not None and not isinstance(setting, list):
            break  # a plain value: mergekit reads no further
    return resolve_parameter(
        spec, scopes, tensor_name=tensor, model=None if model is None else model.model
    )


def _deltas(recipe: AdapterRecipe, name: str) -> Tuple[bool, List[float], List[float], int]:
    """Per adapter ``||delta_i||_F`` and ``sum(delta_i)`` for base tensor ``name``."""
    shape = recipe.shapes[name]
    numel = math.prod(shape)
    if any(name in adapter.modules for adapter in recipe.adapters):
        norms, sums = [], []
        for adapter in recipe.adapters:
            if name not in adapter.modules:
                norms.append(0.0)
                sums.append(0.0)
                continue
            b, a = adapter.factors(name)
            scale = adapter.modules[name].scale
            norms.append(factor_norm(b, a, scale))
            sums.append(factor_sum(b, a, scale))
        return True, norms, sums, numel
    base = recipe.base_tensor(name)
    tensors = [
        adapter.tensor(name) if name in adapter.saved else base for adapter in recipe.adapters
    ]
    found, totals = norms_and_sums(tensors, base)
    assert totals is not None
    return False, found.tolist(), totals.tolist(), numel


def _specs(method: Any) -> Dict[str, ParameterSpec]:
    """``method``'s parameter specs by name; a required one may be left out (None)."""
    return {p.name: optional(p) if p.required else p for p in method.spec.parameters}


def _reading(
    config: MergeConfiguration,
    method: Any,
    specs: Dict[str, ParameterSpec],
    recipe: AdapterRecipe,
    name: str,
    norms: Sequence[float],
) -> Tuple[Optional[Weighting], List[float], float, bool]:
    """NAN's per-tensor reading (None without NAN), the weights given, lambda and normalize.

    The parameters are read by ``method``'s :func:`_specs` (a ``weight`` missing
    for ``task_arithmetic`` is refused here, by name); the reading is the core's
    (:func:`~mergekit_nan.weighting.norm_weighting`) from the factors' norms.
    """
    lam = _resolved(config, specs["lambda"], name)
    check_scale(name, "lambda", lam, torch.float64, nonzero=False)
    given = [_resolved(config, specs["weight"], name, m) for m in config.models or ()]
    normalize = "normalize" in specs and _resolved(config, specs["normalize"], name)
    references = tuple(adapter.reference for adapter in recipe.adapters)
    if not is_nan_method(method):
        missing = [str(r) for r, w in zip(references, given) if w is None]
        if missing:
            raise AdapterError(
                f"task_arithmetic needs a weight for every model; {', '.join(missing)} "
                f"has none for tensor {name!r}"
            )
        for weight in given:
            check_scale(name, "weight", weight, torch.float64, nonzero=False)
        return None, given, lam, normalize
    nan_norm = _resolved(config, specs[NAN_NORM.name], name)
    if nan_norm not in ("auto", "delta"):
        raise AdapterError(
            f"nan_norm: {nan_norm} weighs whole tensors, but an adapter recipe merges the "
            "adapters' updates (the task vectors s_i B_i A_i); use nan_norm: auto or delta"
            + FULL_MODEL_HINT
        )
    composite = isinstance(method, NanCoefficients)
    weighting = norm_weighting(
        references,
        torch.tensor(list(norms), dtype=torch.float64),
        tensor=name,
        exponent=_resolved(config, specs[NAN_EXPONENT.name], name),
        scale=weight_total(config.merge_method, name, list(zip(references, given)), torch.float64)
        if composite
        else lam,
        scales_weights=composite,
        prior=None if composite else given,
        delta=True,
    )
    return weighting, [], lam, normalize


def _task_arithmetic(
    weights: Sequence[float], lam: float, normalize: bool, norms: Sequence[float]
) -> Tuple[float, ...]:
    """Each ``delta_i``'s multiplier under ``task_arithmetic`` with ``weights``.

    The divisor is mergekit's (``GeneralizedTaskArithmeticMerge``): the weights'
    sum with ``normalize``, 1 where that sum is below 1e-8; a zero update gets 0.
    """
    divisor = math.fsum(weights) if normalize else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    return without_zero_updates([lam * weight / divisor for weight in weights], norms)


def adapter_updates(
    config: MergeConfiguration, recipe: AdapterRecipe, granularity: Granularity
) -> Tuple[List[TensorUpdate], Dict[Any, Dict[Any, float]]]:
    """Every base tensor an adapter changes, with its per-adapter multipliers, in base order.

    Also returns the pooled norms per group (``layer``: per ``(module, layer)``;
    ``model``: under None), by adapter reference, as
    :func:`~mergekit_nan.granularity.pooled_weightings` gives them.

    Raises :class:`~mergekit_nan.doctor.adapters.AdapterError` for a method or
    parameter an adapter merge cannot honour, naming the tensor; a value the
    method's specs or the core refuse raises as it does for full models.
    """
    method = factor_method(config)
    nan = isinstance(method, NanMerge)
    if granularity != "tensor" and not is_nan_method(method):
        raise AdapterError(
            f"--granularity {granularity} needs a NAN method, not {config.merge_method}"
        )
    changed = set(recipe.lora_names) | set(recipe.saved_names)
    names = [name for name in recipe.shapes if name in changed]
    if granularity == "layer" and not recipe.layers:
        raise AdapterError(
            "layer granularity needs the base model's layers, but mergekit does not know "
            "its architecture; use tensor or model granularity"
        )
    specs = _specs(method)
    measured = []
    for name in names:
        lora, norms, sums, numel = _deltas(recipe, name)
        weighting, given, lam, normalize = _reading(config, method, specs, recipe, name, norms)
        measured.append((name, lora, norms, sums, numel, weighting, given, lam, normalize))
    pooled: List[Optional[Weighting]] = [item[5] for item in measured]
    groups: Dict[Any, Dict[Any, float]] = {}
    if granularity != "tensor":
        keyed = [(recipe.layers.get(item[0]), item[5]) for item in measured]
        used, groups = pooled_weightings(keyed, granularity)  # type: ignore[arg-type]
        pooled = list(used)
    updates = []
    for (name, lora, norms, sums, numel, _, given, lam, normalize), used in zip(measured, pooled):
        if nan:
            assert used is not None
            coefficients = used.update_coefficients(norms)
        else:
            weights = list(used.weights) if used is not None else given
            coefficients = _task_arithmetic(weights, lam, normalize, norms)
        updates.append(
            TensorUpdate(
                name=name,
                layer=recipe.layers.get(name),
                lora=lora,
                norms=tuple(norms),
                sums=tuple(sums),
                numel=numel,
                weighting=used,
                coefficients=coefficients,
            )
        )
    return updates, groups


def _combined(recipe: AdapterRecipe, adapter: ModelReference) -> ModelReference:
    """``base+adapter``, the adapter by absolute path (mergekit's card asks the Hugging Face
    hub about a relative LoRA path without a slash)."""
    lora = adapter.model.model_copy(update={"path": os.path.abspath(adapter.model.path)})
    return ModelReference(model=recipe.base.model, lora=lora)


def base_adapter_config(config: MergeConfiguration, recipe: AdapterRecipe) -> MergeConfiguration:
    """The recipe over ``base+adapter_i`` models: what the adapter merge reproduces."""
    data = config.model_dump(mode="json", exclude_none=True)
    for model, adapter in zip(data["models"], recipe.adapters):
        model["model"] = str(_combined(recipe, adapter.reference))
    return MergeConfiguration.model_validate(data)


def _normalised(
    config: MergeConfiguration, recipe: AdapterRecipe
) -> Tuple[MergeConfiguration, str]:
    """``config`` over ``base+adapter`` models in mergekit's planned form (one module, one slice)."""
    modules = sorted({module for module, _ in recipe.layers.values()}) or ["default"]
    if len(modules) != 1:
        raise AdapterError("freezing an adapter recipe needs a single-module architecture")
    layers = 1 + max((index for _, index in recipe.layers.values()), default=-1)
    stock = base_adapter_config(config, recipe)
    sources = [
        InputSliceDefinition(model=m.model, layer_range=(0, layers), parameters=m.parameters)
        for m in stock.models or ()
    ]
    sources.append(InputSliceDefinition(model=recipe.base, layer_range=(0, layers)))
    module = OutputModuleDefinition(slices=[OutputSliceDefinition(sources=sources)])
    planned = stock.model_copy(update={"models": None, "modules": {modules[0]: module}})
    return planned, modules[0]


def _kind(name: str, layer: Optional[Tuple[str, int]]) -> str:
    if layer is not None and f".{layer[1]}." in name:
        name = name.split(f".{layer[1]}.", 1)[1]
    return name[: -len(".weight")] if name.endswith(".weight") else name


def adapter_inspection(
    config: MergeConfiguration,
    recipe: AdapterRecipe,
    granularity: Granularity,
    measured: Optional[Tuple[List[TensorUpdate], Dict[Any, Dict[Any, float]]]] = None,
) -> Inspection:
    """The :class:`~mergekit_nan.commands.inspection.coefficient_pass.Inspection` of the ``base+adapter`` recipe.

    Rows are the tensors some adapter changes; the models are ``base+adapter``
    references, so :func:`~mergekit_nan.commands.inspection.freeze.freeze_recipe` writes a
    stock recipe over them. Tensors no adapter changes are listed as skipped
    (their update is zero, so any weight leaves them at the base). ``measured``
    is :func:`adapter_updates`'s result when the caller has it.
    """
    method = factor_method(config)
    if not is_nan_method(method):
        raise AdapterError(
            f"the recipe's merge_method is {config.merge_method!r}, which does not use NAN "
            "coefficients; use nan or task_arithmetic+nan"
        )
    updates, groups = measured or adapter_updates(config, recipe, granularity)
    planned, module = _normalised(config, recipe)
    models = tuple(_combined(recipe, a.reference) for a in recipe.adapters)
    rows = []
    for update in updates:
        weighting = update.weighting
        assert weighting is not None
        rows.append(
            TensorCoefficients(
                name=update.name,
                module=module,
                slice_index=0,
                layer=None if update.layer is None else update.layer[1],
                kind=_kind(update.name, update.layer),
                models=models,
                inputs=(update.name,) * len(models),
                norms=update.norms,
                shares=weighting.shares,
                weights=weighting.weights,
                scale=weighting.scale,
                sums=update.sums,
                numel=update.numel,
                delta=True,
            )
        )
    changed = {update.name for update in updates}
    combined = {a.reference: m for a, m in zip(recipe.adapters, models)}
    pooled = {k: {combined[a]: v for a, v in g.items()} for k, g in groups.items()}
    return Inspection(
        merge_method=config.merge_method,
        inner_method="task_arithmetic",
        granularity=granularity,
        base_model=recipe.base,
        models=models,
        tensors=tuple(rows),
        config=planned,
        model_norms=pooled.get(None) if granularity == "model" else None,
        layer_norms={k: v for k, v in pooled.items() if k is not None}
        if granularity == "layer"
        else None,
        skipped=tuple(name for name in recipe.shapes if name not in changed),
    )
