"""One PEFT LoRA adapter on disk: its config and factor headers, checked against the base.

:func:`read_adapter` reads ``adapter_config.json`` and the header of
``adapter_model.safetensors`` (no tensor data) and refuses, with one
:class:`AdapterError` naming the adapter and the module, what cannot be merged
as LoRA factors: a non-LoRA PEFT type, DoRA, LoRA biases (``bias`` other than
``none``, ``lora_bias``), ``fan_in_fan_out``, ``target_parameters``, trainable
tokens, layer replication, embedding LoRA, an adapter trained on another base
model, tensors that are neither factors nor base tensors, and shapes that do
not fit the base. A module's scaling is PEFT's: ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``rank_pattern`` and
``alpha_pattern`` overrides matched as PEFT matches them. Tensor data is read
on demand (:meth:`Adapter.factors`, :meth:`Adapter.tensor`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mergekit.common import ModelReference
from safetensors import safe_open

from mergekit_nan.errors import RecipeError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "AdapterError",
    "LoraModule",
    "is_adapter_directory",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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


def read_adapter(
    reference: ModelReference, base: ModelReference, base_path: str, shapes: Mapping
) -> Adapter:
    """The adapter ``reference`` of ``base`` (at ``base_path``, with tensor ``shapes``), checked."""
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
