"""The NAN coefficients a recipe's merge would use, computed without merging.

:func:`inspect_recipe` plans the recipe with mergekit's own machinery
(``MergeConfiguration``, architecture detection, ``MergePlanner`` with its
parameter resolver, ``LoaderCache``) and runs the planned merge tasks on
mergekit's executor, which loads each input tensor lazily and drops it once
its coefficients are known: peak memory is about one tensor per input. Each
task is mergekit's own merge adapter (optional-tensor policy, validation,
parameter binding, dtype) run in the measurement mode of
:mod:`mergekit_nan.measure`, so nothing of it is re-implemented here.

Per tensor, the coefficients are those the merge computes: for ``nan`` the
alpha_i of :class:`~mergekit_nan.method.NanMerge` (with its ``lambda``), for
``<method>+nan`` the ``weight`` values :class:`~mergekit_nan.modifier.NanCoefficients`
passes to the inner method (NAN ratios times the weight total).

At ``granularity="layer"`` and ``"model"`` the per-tensor norms are pooled
as :mod:`mergekit_nan.granularity` describes: one norm per model per output
transformer layer, ``sqrt(sum_t ||x_i,t||^2)`` over the layer's tensors
(embeddings, final norm and ``lm_head`` keep their per-tensor coefficients),
or one per model over every tensor NAN sees. Every tensor then gets the
ratios of its group's pooled norms, with its own exponent, priors and scale.
The granularity comes from the argument, else the recipe's top-level
``nan_granularity``, else ``tensor``; ``nan_granularity`` is removed from the
configuration before planning.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from mergekit import merge_methods
from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.multigpu_executor import MultiGPUExecutor
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from mergekit_nan.granularity import (
    pooled_weightings,
    resolve_granularity,
    without_granularity,
)
from mergekit_nan.measure import measuring
from mergekit_nan.mergekit_compat import module_layers, plan_recipe, planned_tasks
from mergekit_nan.modifier import NanCoefficients
from mergekit_nan.parameters import Granularity
from mergekit_nan.recipe import require_nan_recipe
from mergekit_nan.weighting import Weighting

__all__ = [
    "Granularity",
    "Inspection",
    "TensorCoefficients",
    "inspect_recipe",
    "measure_recipe",
]


@dataclass(frozen=True)
class TensorCoefficients:
    """The NAN coefficients of one output tensor.

    ``models``, ``inputs``, ``norms``, ``shares`` and ``weights`` are aligned:
    one entry per model that NAN weighs. ``shares`` sum to one; ``weights``
    are the values the merge uses (alpha_i for ``nan``, the inner method's
    ``weight`` for ``<method>+nan``); ``scale`` is ``lambda`` for ``nan`` (1
    without a base) and the weight total for ``<method>+nan``. ``sums`` are
    the sums of the elements of each x_i, of ``numel`` elements; ``delta``:
    the x_i are task vectors (else the tensors themselves).
    """

    name: str
    module: str
    slice_index: int
    layer: Optional[int]
    kind: str
    models: Tuple[ModelReference, ...]
    inputs: Tuple[str, ...]
    norms: Tuple[float, ...]
    shares: Tuple[float, ...]
    weights: Tuple[float, ...]
    scale: float
    sums: Tuple[float, ...] = ()
    numel: int = 0
    delta: bool = False

    @property
    def mean_shifts(self) -> Tuple[float, ...]:
        """|mean(x_i)| / rms(x_i) per model: 0 for a zero-mean x_i, 1 for a constant one."""
        return tuple(
            abs(total) / (math.sqrt(self.numel) * norm) if norm > 0 and self.numel else 0.0
            for total, norm in zip(self.sums, self.norms)
        )


@dataclass(frozen=True)
class Inspection:
    """Everything :func:`inspect_recipe` found, in the merge's tensor order.

    ``config`` is the recipe as mergekit normalises it (``modules`` of
    ``slices``), which ``tensors[i].module``/``slice_index`` refer to.
    ``model_norms`` holds the whole-model norms at ``model`` granularity,
    ``layer_norms`` the pooled norms per ``(module, layer)`` at ``layer``
    granularity; ``tensors[i].norms`` are always the tensor's own norms.
    ``skipped`` names tensors the merge copies without NAN (non-float buffers,
    optional tensors passed through).
    """

    merge_method: str
    inner_method: str
    granularity: Granularity
    base_model: Optional[ModelReference]
    models: Tuple[ModelReference, ...]
    tensors: Tuple[TensorCoefficients, ...]
    config: MergeConfiguration
    model_norms: Optional[Dict[ModelReference, float]] = None
    layer_norms: Optional[Dict[Tuple[str, int], Dict[ModelReference, float]]] = None
    skipped: Tuple[str, ...] = ()


@dataclass(frozen=True)
class _Placement:
    """Where the planner found one output tensor's settings."""

    module: str
    slice_index: int
    layer: Optional[int]
    kind: str
    inputs: Tuple[str, ...]


def _kind(name: str, layer: Optional[int]) -> str:
    if layer is not None:
        marker = f".{layer}."
        if marker in name:
            name = name.split(marker, 1)[1]
    return name[: -len(".weight")] if name.endswith(".weight") else name


class _RecordingPlanner(MergePlanner):
    """mergekit's planner, noting the module, slice and layer of each tensor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.placements: List[_Placement] = []
        self._module_name = ""
        self._layer: Optional[int] = None

    def plan_module(self, module_name, definition):
        self._module_name = module_name
        super().plan_module(module_name, definition)

    def plan_layer(self, sources, layer_offset, t, cfg_reader, module_name):
        self._layer = module_layers(self)
        try:
            super().plan_layer(sources, layer_offset, t, cfg_reader, module_name)
        finally:
            self._layer = None

    def plan_tensor(
        self,
        weight: WeightInfo,
        weights_in: List[WeightInfo],
        models: List[ModelReference],
        cfg_reader,
    ):
        before = len(planned_tasks(self))
        super().plan_tensor(weight, weights_in, models, cfg_reader)
        if len(planned_tasks(self)) == before:
            return
        slices = self.config.modules[self._module_name].slices
        index = next(i for i, s in enumerate(slices) if s is cfg_reader.slice_out)
        self.placements.append(
            _Placement(
                module=self._module_name,
                slice_index=index,
                layer=self._layer,
                kind=_kind(weight.name, self._layer),
                inputs=tuple(w.name for w in weights_in),
            )
        )


def _check_shapes(merge: ExecuteMergeMethodTask, tensors: Dict[ModelReference, torch.Tensor]):
    """Mismatched shapes, named by model (mergekit's own message lists only the shapes)."""
    present = [model for model in merge.model_order if model in tensors]
    reference = merge.base_model if merge.base_model in tensors else present[0]
    expected = tensors[reference].shape
    for model in present:
        if tensors[model].shape != expected:
            raise ValueError(
                f"tensor {merge.output_weight.name!r} has shape {tuple(tensors[model].shape)} "
                f"in model {model} but {tuple(expected)} in model {reference}; NAN needs "
                "matching shapes"
            )


class _CoefficientTask(Task[Optional[Weighting]]):
    """One planned merge task, run by mergekit's own adapter in measurement mode.

    Same inputs as the merge; the value is the tensor's weighting, or None
    where the merge copies the tensor without NAN (see :mod:`mergekit_nan.measure`).
    """

    merge: ExecuteMergeMethodTask

    def arguments(self) -> Dict[str, Task]:
        return self.merge.arguments()

    def group_label(self) -> Optional[str]:
        return self.merge.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(
        self, tensors: Dict[ModelReference, torch.Tensor], **_kwargs
    ) -> Optional[Weighting]:
        if tensors:
            _check_shapes(self.merge, tensors)
        with measuring():
            value = self.merge.execute(tensors=tensors)
        return value if isinstance(value, Weighting) else None


def inspect_recipe(
    config: MergeConfiguration,
    *,
    granularity: Optional[Granularity] = None,
    options: Optional[MergeOptions] = None,
) -> Inspection:
    """Compute the NAN coefficients of every tensor ``config`` merges.

    ``granularity`` None means the recipe's ``nan_granularity``, else
    ``tensor``; a misplaced or unknown ``nan_granularity`` is a
    :class:`~mergekit_nan.errors.RecipeError`.
    ``options`` are mergekit's (``device``, ``multi_gpu``, ``lora_merge_cache``,
    ``transformers_cache``, ``trust_remote_code``, ``allow_crimes``,
    ``quiet``); LoRA references are merged the way mergekit merges them, into
    ``options.lora_merge_cache`` or a temporary directory. Raises
    ``ValueError`` for a recipe without a NAN method, mismatched shapes or
    non-finite tensors, and ``FileNotFoundError`` for missing local models;
    messages name the tensor and the model.
    """
    granularity = resolve_granularity(config, granularity)
    require_nan_recipe(config)
    return measure_recipe(without_granularity(config), granularity, options or MergeOptions())


def measure_recipe(
    config: MergeConfiguration, granularity: Granularity, options: MergeOptions
) -> Inspection:
    """:func:`inspect_recipe` for a recipe already validated, without ``nan_granularity``.

    For callers that have run :func:`require_nan_recipe` and resolved the
    granularity themselves (``mergekit-nan merge``), so a recipe is checked once.
    """
    with tempfile.TemporaryDirectory(prefix="mergekit-nan-lora-") as lora_dir:
        temporary = options.lora_merge_cache is None
        if temporary:
            options = options.model_copy(update={"lora_merge_cache": lora_dir})
        loaders = LoaderCache()
        loaders.setup(options=options)
        for model in config.referenced_models():
            loaders.get(model)
        planner = plan_recipe(config, options, _RecordingPlanner)
        planned = planned_tasks(planner)  # (output WeightInfo, merge task) pairs
        tasks = [_CoefficientTask(merge=merge) for _, merge in planned]
        if options.multi_gpu:
            # Each tensor's norms are computed on the GPU that holds it.
            executor = MultiGPUExecutor(tasks, storage_device="cpu")
        else:
            executor = Executor(tasks, math_device=options.device or "cpu", storage_device="cpu")
        results: Dict[Task, Optional[Weighting]] = {}
        try:
            for task, value in executor.run(quiet=options.quiet, desc="NAN coefficients"):
                results[task] = value
        finally:
            loaders.flush_all()
            if temporary:
                # Merged adapters live in the temporary directory: forget them.
                for model in config.referenced_models():
                    if model.lora is not None:
                        loaders.loaders.pop(model, None)
    measured = [results[task] for task in tasks]
    kept = [(p, m, t) for p, m, t in zip(planner.placements, measured, planned) if m is not None]
    used_weightings, pooled = pooled_weightings(
        [(_group_key(placement), item) for placement, item, _ in kept], granularity
    )
    rows = []
    for (placement, item, target), used in zip(kept, used_weightings):
        weight_info, merge = target
        position = {model: i for i, model in enumerate(merge.model_order)}
        rows.append(
            TensorCoefficients(
                name=weight_info.name,
                module=placement.module,
                slice_index=placement.slice_index,
                layer=placement.layer,
                kind=placement.kind,
                models=item.models,
                inputs=tuple(placement.inputs[position[model]] for model in item.models),
                norms=item.norms,
                shares=used.shares,
                weights=used.weights,
                scale=item.scale,
                sums=item.sums or (),
                numel=item.numel,
                delta=item.delta,
            )
        )
    method = merge_methods.get(config.merge_method)
    order: Dict[ModelReference, None] = {}
    for row in rows:
        order.update(dict.fromkeys(row.models))
    return Inspection(
        merge_method=config.merge_method,
        inner_method=_inner_name(method, config),
        granularity=granularity,
        base_model=config.base_model,
        models=tuple(order),
        tensors=tuple(rows),
        config=planner.config,
        model_norms=pooled.get(None) if granularity == "model" else None,
        layer_norms={k: v for k, v in pooled.items() if k is not None}
        if granularity == "layer"
        else None,
        skipped=tuple(
            weight_info.name for (weight_info, _), m in zip(planned, measured) if m is None
        ),
    )


def _group_key(placement: _Placement) -> Optional[Tuple[str, int]]:
    return None if placement.layer is None else (placement.module, placement.layer)


def _inner_name(method, config: MergeConfiguration) -> str:
    if isinstance(method, NanCoefficients):
        return method.inner.spec.name
    return "task_arithmetic" if _has_base(config) else "linear"


def _has_base(config: MergeConfiguration) -> bool:
    if config.base_model is not None:
        return True
    for module in (config.modules or {}).values():
        if any(s.base_model is not None for s in module.slices or ()):
            return True
    return any(s.base_model is not None for s in config.slices or ())
