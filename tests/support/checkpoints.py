"""Reading the tensors of a checkpoint directory."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file


def load_model_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (any number of shards)."""
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


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
