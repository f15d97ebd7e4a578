"""Reading the tensors of a checkpoint directory."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file


def load_model_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (any number of shards)."""
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def stored_shapes(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of a checkpoint directory, as torch loads them."""
    return {name: (tuple(t.shape), t.dtype) for name, t in load_model_tensors(path).items()}


def tensor_nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


_FLOAT64: Dict[Path, Dict[str, torch.Tensor]] = {}


def tensors_of(path: Path) -> Dict[str, torch.Tensor]:
    """:func:`load_model_tensors` in float64, read once per path and kept (treat as read-only)."""
    if path not in _FLOAT64:
        _FLOAT64[path] = {k: v.double() for k, v in load_model_tensors(path).items()}
    return _FLOAT64[path]


def snapshot(*roots: Path) -> Dict[str, str]:
    """Path -> SHA-256 of every file under ``roots`` (an absent root contributes nothing)."""
    digests = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else ():
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def write_lora_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter on ``base`` with random B (``b_scale``) and ``config``
    (``peft.LoraConfig``'s arguments); seed 2 has a zero update on layer 1's v_proj."""
    import peft
    from transformers import LlamaForCausalLM

    scale = config.pop("b_scale")
    model = LlamaForCausalLM.from_pretrained(base)
    lora = peft.get_peft_model(model, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
                if "layers.1.self_attn.v_proj" in name and seed == 2:
                    parameter.zero_()  # a zero update: no say for this adapter here
            elif "modules_to_save" in name:
                parameter.add_(0.03 * torch.randn(parameter.shape, generator=generator))
    lora.save_pretrained(out)
    return out
