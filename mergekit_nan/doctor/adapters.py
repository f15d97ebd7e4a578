"""Adapter recipes: every model a local PEFT LoRA adapter of the recipe's ``base_model``.

:func:`adapter_recipe` recognises such a recipe (None for any other recipe)
and reads every adapter's ``adapter_config.json`` and the header of its
``adapter_model.safetensors``, checked against the base model's headers, so
that every refusal comes before anything is written: one :class:`AdapterError`
line naming the adapter and the module. Refused: a recipe mixing adapters and
full models, ``slices``/``modules`` recipes, a non-LoRA PEFT type, DoRA, LoRA
biases (``bias`` other than ``none``, ``lora_bias``), ``fan_in_fan_out``,
``target_parameters``, trainable tokens, embedding LoRA, adapters trained on
another base model, unknown tensors, shapes that do not fit the base, and a
module that one adapter trains fully (``modules_to_save``) and another adapts
with LoRA.

A module's scaling is PEFT's: ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``), with ``rank_pattern``/``alpha_pattern`` overrides
matched as PEFT matches them. Tensor data is read on demand
(:meth:`Adapter.factors`, :meth:`Adapter.tensor`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mergekit import merge_methods
from mergekit.architecture import arch_info_for_config
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from safetensors import safe_open

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.errors import RecipeError
from mergekit_nan.method import NanMerge
from mergekit_nan.modifier import NanCoefficients
from mergekit_nan.registration import register_methods

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FACTOR_METHODS",
    "FULL_MODEL_HINT",
    "adapter_findings",
    "factor_method",
    "Adapter",
    "AdapterError",
    "AdapterRecipe",
    "LoraModule",
    "adapter_recipe",
    "is_adapter_directory",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FACTOR_METHODS = ("nan", "task_arithmetic+nan", "task_arithmetic")
"""Methods whose merge of ``base+adapter`` inputs is a weighted sum of the updates."""
FULL_MODEL_HINT = (
    "; `mergekit-nan merge --full-model` merges any method over BASE+ADAPTER models "
    "into a full model"
)
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(RecipeError):
    """An adapter recipe that cannot be merged as factors; the message names adapter and module."""


def is_adapter_directory(path: str) -> bool:
    """Whether ``path`` is a local directory holding a PEFT adapter config."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG))


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of one adapter: ``delta = scale * B @ A`` on base tensor ``name``."""

    name: str
    module: str
    a_key: str
    b_key: str
    rank: int
    scale: float


@dataclass(frozen=True)
class Adapter:
    """One adapter of the recipe: its LoRA modules and fully trained tensors, by base tensor name."""

    reference: ModelReference
    path: str
    modules: Dict[str, LoraModule]
    saved: Dict[str, str]
    task_type: Optional[str]

    @property
    def weights_file(self) -> str:
        return os.path.join(self.path, ADAPTER_WEIGHTS)

    def factors(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of the module on base tensor ``name``."""
        module = self.modules[name]
        with safe_open(self.weights_file, framework="pt") as file:
            return file.get_tensor(module.b_key), file.get_tensor(module.a_key)

    def tensor(self, name: str) -> torch.Tensor:
        """The fully trained (``modules_to_save``) tensor that replaces base tensor ``name``."""
        with safe_open(self.weights_file, framework="pt") as file:
            return file.get_tensor(self.saved[name])


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


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the module's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _same_base(named: Optional[str], base: str) -> bool:
    if not named:
        return True
    if named == base:
        return True
    here = os.path.expanduser(named)
    return os.path.exists(here) and os.path.realpath(here) == os.path.realpath(base)


def _refuse_config(label: str, settings: Mapping[str, Any], keys: List[str]) -> None:
    kind = settings.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"adapter {label} is a {kind} adapter; only LoRA adapters are merged")
    module = next((k for k in keys if "lora_magnitude_vector" in k), "its modules")
    if settings.get("use_dora"):
        raise AdapterError(
            f"adapter {label} uses DoRA (use_dora: true, module {module}): its update "
            "is not scale * B @ A, so it cannot be merged as LoRA factors"
        )
    if settings.get("bias", "none") != "none" or settings.get("lora_bias"):
        biased = next((k for k in keys if k.endswith(".bias")), None)
        raise AdapterError(
            f"adapter {label} trains biases (bias: {settings.get('bias')!r}, lora_bias: "
            f"{bool(settings.get('lora_bias'))}"
            + (f", tensor {biased}" if biased else "")
            + "); only adapters with bias: none and no lora_bias are merged"
        )
    for field, why in (
        ("fan_in_fan_out", "stores transposed factors"),
        ("target_parameters", "adapts raw parameters"),
        ("trainable_token_indices", "trains token rows"),
        ("layer_replication", "replicates layers"),
    ):
        if settings.get(field):
            raise AdapterError(f"adapter {label} sets {field} ({why}), which is not supported")


def _read_adapter(
    reference: ModelReference, base: ModelReference, base_path: str, shapes: Mapping
) -> Adapter:
    label = str(reference)
    path = os.path.expanduser(reference.model.path)
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as file:
            settings = json.load(file)
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {label}: cannot read {ADAPTER_CONFIG}: {error}") from None
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise AdapterError(f"adapter {label} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(weights, framework="pt") as file:
            headers = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a broken file
        raise AdapterError(f"adapter {label}: cannot read {ADAPTER_WEIGHTS}: {error}") from None
    _refuse_config(label, settings, sorted(headers))
    named = settings.get("base_model_name_or_path")
    if not _same_base(named, base_path):
        raise AdapterError(
            f"adapter {label} was trained on {named}, not on the recipe's base_model {base}"
        )
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    modules: Dict[str, LoraModule] = {}
    saved: Dict[str, str] = {}
    for key, shape in headers.items():
        inner = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        found = _LORA.match(inner)
        if "lora_embedding" in inner:
            raise AdapterError(
                f"adapter {label} adapts embedding module {inner.split('.lora_')[0]}, "
                "which is not supported; target linear modules only"
            )
        if found is None:
            if inner not in shapes:
                raise AdapterError(
                    f"adapter {label} holds tensor {key}, which is neither a LoRA factor "
                    f"nor a tensor of base_model {base}"
                )
            if shape != shapes[inner]:
                raise AdapterError(
                    f"adapter {label} tensor {inner} has shape {shape}, but base_model "
                    f"{base} has {shapes[inner]}"
                )
            saved[inner] = key
            continue
        module = found.group("module")
        name = module + ".weight"
        if name not in shapes:
            raise AdapterError(
                f"adapter {label} adapts module {module}, which base_model {base} does not have"
            )
        if found.group("part") == "B":
            continue
        b_key = key[: -len("lora_A.weight")] + "lora_B.weight"
        b_shape = headers.get(b_key)
        r = int(_pattern_value(settings.get("rank_pattern"), module, rank))
        target = shapes[name]
        if b_shape is None or len(shape) != 2 or len(b_shape) != 2 or len(target) != 2:
            raise AdapterError(
                f"adapter {label} module {module}: expected 2-D lora_A and lora_B factors "
                f"on a 2-D base tensor; got A {shape}, B {b_shape}, base {target}"
            )
        if b_shape != (target[0], r) or shape != (r, target[1]):
            raise AdapterError(
                f"adapter {label} module {module}: factors B {b_shape} and A {shape} do not "
                f"give base_model {base}'s shape {target} at rank {r}"
            )
        module_alpha = float(_pattern_value(settings.get("alpha_pattern"), module, alpha))
        scale = module_alpha / (math.sqrt(r) if settings.get("use_rslora") else r)
        modules[name] = LoraModule(name, module, key, b_key, r, scale)
    lonely = [k for k in headers if k.endswith("lora_B.weight")]
    for key in lonely:
        if key.replace("lora_B.weight", "lora_A.weight") not in headers:
            raise AdapterError(f"adapter {label} has {key} without its lora_A factor")
    return Adapter(reference, path, modules, saved, settings.get("task_type") or None)


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
    adapters = tuple(_read_adapter(ref, base, path, shapes) for ref in references)
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
    elif isinstance(method, (NanMerge, NanCoefficients)) or "weight" in {
        p.name for p in method.spec.parameters
    }:
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
