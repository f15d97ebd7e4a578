"""Adapter recipes: every model a local PEFT LoRA adapter of the recipe's ``base_model``.

:func:`adapter_recipe` recognises such a recipe (None for any other recipe)
and reads every adapter (:mod:`mergekit_nan.doctor.adapter_files`) against
the base model's safetensors headers, so that every refusal comes before
anything is written: one :class:`AdapterError` line naming the adapter and the
module. Refused here: a recipe mixing adapters and full models, adapters in
``slices``/``modules``, a base that is not a local safetensors model, and a
module that one adapter trains fully (``modules_to_save``) and another adapts
with LoRA. :func:`factor_method` says which merge methods an adapter merge
can honour; :func:`adapter_findings` is ``check``'s view of such a recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from mergekit import merge_methods
from mergekit.architecture import arch_info_for_config
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from safetensors import safe_open

from mergekit_nan.doctor.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    AdapterError,
    LoraModule,
    is_adapter_directory,
    read_adapter,
)
from mergekit_nan.doctor.findings import Finding
from mergekit_nan.registration import is_nan_method, register_methods

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FACTOR_METHODS",
    "FULL_MODEL_HINT",
    "Adapter",
    "AdapterError",
    "AdapterRecipe",
    "LoraModule",
    "adapter_findings",
    "adapter_models",
    "adapter_recipe",
    "factor_method",
    "is_adapter_directory",
]

FACTOR_METHODS = ("nan", "task_arithmetic+nan", "task_arithmetic")
"""Methods whose merge of ``base+adapter`` inputs is a weighted sum of the updates."""
FULL_MODEL_HINT = (
    "; `mergekit-nan merge --full-model` merges any method over BASE+ADAPTER models "
    "into a full model"
)


@dataclass(frozen=True)
class AdapterRecipe:
    """A validated adapter recipe: the base model's tensors and the adapters on them.

    ``shapes`` and ``files`` map every base tensor name to its shape and
    safetensors file; ``layers`` maps the tensors of transformer layers to
    ``(module, layer)`` as mergekit's architecture lists them (empty for an
    architecture mergekit does not know).
    """

    base: ModelReference
    base_path: str
    adapters: Tuple[Adapter, ...]
    shapes: Dict[str, Tuple[int, ...]]
    files: Dict[str, str]
    layers: Dict[str, Tuple[str, int]]

    def base_tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as file:
            return file.get_tensor(name)

    @property
    def lora_names(self) -> List[str]:
        """Base tensors some adapter adapts with LoRA, in base order."""
        found = {name for adapter in self.adapters for name in adapter.modules}
        return [name for name in self.shapes if name in found]

    @property
    def saved_names(self) -> List[str]:
        """Base tensors some adapter trains fully (``modules_to_save``), in base order."""
        found = {name for adapter in self.adapters for name in adapter.saved}
        return [name for name in self.shapes if name in found]


def _base_headers(base: ModelReference) -> Tuple[str, Dict[str, Tuple[int, ...]], Dict[str, str]]:
    path = os.path.expanduser(base.model.path)
    if base.lora is not None or not os.path.isdir(path):
        raise AdapterError(
            f"base_model {base} must be a local model directory for an adapter recipe "
            "(the adapters are merged against its tensors)"
        )
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise AdapterError(f"base_model {base} has no .safetensors files")
    shapes: Dict[str, Tuple[int, ...]] = {}
    files: Dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(os.path.join(path, shard), framework="pt") as file:
                for key in file.keys():
                    shapes[key] = tuple(file.get_slice(key).get_shape())
                    files[key] = os.path.join(path, shard)
        except Exception as error:  # safetensors raises its own error types for a broken file
            raise AdapterError(f"base_model {base}: cannot read {shard}: {error}") from None
    return path, shapes, files


def _layers(base: ModelReference) -> Dict[str, Tuple[str, int]]:
    config = base.config()
    arch = arch_info_for_config(config)
    if arch is None:
        return {}
    found: Dict[str, Tuple[str, int]] = {}
    for module_name, definition in arch.modules.items():
        module = definition.architecture
        prefix = definition.weight_prefix or ""
        for index in range(module.num_layers(config)):
            for weight in module.layer_weights(index, config) or ():
                found[prefix + weight.name] = (module_name, index)
    return found


def adapter_models(config: MergeConfiguration) -> Optional[List[ModelReference]]:
    """The recipe's adapters when every model is a local adapter directory, else None.

    A recipe that names adapters beside full models, or adapters in ``slices``
    or ``modules``, is an :class:`AdapterError`.
    """
    listed = [m.model for m in config.models or ()]
    adapters = [m for m in listed if m.lora is None and is_adapter_directory(m.model.path)]
    if config.models is None:
        inside = [
            m
            for m in config.referenced_models()
            if m.lora is None and is_adapter_directory(m.model.path)
        ]
        if inside:
            raise AdapterError(
                f"adapter {inside[0]} is used in slices or modules; an adapter recipe "
                "lists its adapters under models:"
            )
        return None
    if not adapters:
        return None
    others = [str(m) for m in listed if m not in adapters]
    if others:
        raise AdapterError(
            f"the recipe mixes LoRA adapters ({adapters[0]}) with full models "
            f"({', '.join(others)}); list every adapter as BASE+ADAPTER to merge "
            "full models, or only adapters to merge them as an adapter"
        )
    if config.base_model is None:
        raise AdapterError(
            "an adapter recipe needs base_model: the model the adapters were trained on"
        )
    return adapters


def adapter_recipe(config: MergeConfiguration) -> Optional[AdapterRecipe]:
    """The validated :class:`AdapterRecipe` of ``config``, or None if it names no adapter.

    Reads the adapters' configs and headers and the base model's headers;
    every problem is an :class:`AdapterError` naming the adapter and module.
    """
    references = adapter_models(config)
    if references is None:
        return None
    base = config.base_model
    assert base is not None
    path, shapes, files = _base_headers(base)
    adapters = tuple(read_adapter(ref, base, path, shapes) for ref in references)
    for adapter in adapters:
        for name in adapter.saved:
            other = next((a for a in adapters if name in a.modules), None)
            if other is not None:
                raise AdapterError(
                    f"module {name} is trained fully by adapter {adapter.reference} but "
                    f"adapted with LoRA by adapter {other.reference}; merge them as "
                    "BASE+ADAPTER models instead"
                )
    return AdapterRecipe(base, path, adapters, shapes, files, _layers(base))


def factor_method(config: MergeConfiguration):
    """The recipe's merge method if an adapter merge can honour it, else an :class:`AdapterError`.

    ``nan``, ``task_arithmetic+nan`` and ``task_arithmetic`` merge the updates
    as a weighted sum; ``linear`` ignores the base (mergekit adds it as one more
    weighted input, and NAN would weigh whole tensors); the sparsifying methods
    act on the elements of each dense update, whose result is not low rank.
    """
    register_methods()
    name = config.merge_method
    try:
        method = merge_methods.get(name)
    except RuntimeError as error:
        raise AdapterError(str(error)) from None
    if name in FACTOR_METHODS:
        return method
    if name in ("linear", "linear+nan"):
        why = (
            "linear ignores base_model (mergekit adds the base as one more weighted "
            "input, and NAN would weigh whole tensors, not the adapters' updates); "
            "use task_arithmetic+nan (normalize: true gives linear's normalised "
            "weights) or nan"
        )
    elif is_nan_method(method) or "weight" in {p.name for p in method.spec.parameters}:
        why = (
            "it is not a weighted sum of the adapters' updates (sparsifying methods such "
            "as TIES, DARE and DELLA act on the elements of each dense update, so the "
            "result is no longer low rank); use nan or task_arithmetic+nan"
        )
    else:
        why = "it is not a weighted sum of the adapters' updates; use nan or task_arithmetic+nan"
    raise AdapterError(
        f"merge_method {name} cannot merge LoRA adapters into an adapter: {why}" + FULL_MODEL_HINT
    )


def adapter_findings(config: MergeConfiguration) -> Optional[List[Finding]]:
    """``check``'s findings for an adapter recipe (None for any other recipe).

    A broken adapter is an ``adapter-invalid`` error; a method that cannot give
    an adapter a warning (``adapter-method``: ``--full-model`` still merges it);
    a valid recipe an ``adapter-recipe`` info, which the stock commands' guard
    turns into an error (they cannot read adapter directories as models).
    """
    try:
        recipe = adapter_recipe(config)
    except AdapterError as error:
        return [
            Finding(
                "error",
                "adapter-invalid",
                "models",
                error.message,
            )
        ]
    if recipe is None:
        return None
    findings = []
    try:
        factor_method(config)
    except AdapterError as error:
        findings.append(Finding("warning", "adapter-method", "merge_method", error.message, None))
    modules = len(recipe.lora_names)
    findings.append(
        Finding(
            "info",
            "adapter-recipe",
            "",
            f"{len(recipe.adapters)} LoRA adapters of {recipe.base}: {modules} LoRA "
            f"modules, {len(recipe.saved_names)} fully trained tensors; mergekit-nan "
            "merge writes one LoRA adapter (--full-model: the merged model), while the "
            "stock mergekit commands read adapters only as BASE+ADAPTER models",
            "mergekit-nan merge RECIPE OUT_PATH",
        )
    )
    return findings
