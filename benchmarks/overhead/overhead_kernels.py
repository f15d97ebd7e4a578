"""What the overhead benchmark measures inside one process.

The coefficient pass alone (NAN's norms) against a plain read of the same
tensors, and how much the peak RSS grows while one method merges the largest
tensor of a family.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from overhead_models import numel
from safetensors import safe_open

from mergekit_nan.coefficients import frobenius_norms

DENSITY = 0.5
RANDOM_SEED = 0
NO_BASE = " (no base)"
"""Suffix of the recipes that merge the fine-tunes alone (the base model is not read)."""


def _tensor_files(path: Path) -> List[Tuple[str, str]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return list(index["weight_map"].items())


def _clock(device: str) -> float:
    """CPU seconds of this process on the CPU (steady on a shared machine), else wall seconds."""
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def plain_read(tensors: Sequence[torch.Tensor], scratch: torch.Tensor) -> List[torch.Tensor]:
    """The floor: one float32 reduction over each tensor (every byte read once)."""
    return [t.sum(dtype=torch.float32) for t in tensors]


def coefficient_pass(tensors: Sequence[torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
    """What NAN adds per tensor: task-vector norms of the fine-tunes against the base.

    ``scratch`` stands for the merge's float32 output buffer, which ``nan``
    lends to the norm pass as working memory.
    """
    return frobenius_norms(list(tensors[1:]), tensors[0], scratch=scratch)


def measure_norm_pass(paths: Sequence[Path], repeats: int, device: str) -> Dict[str, float]:
    """Seconds and GB/s of the coefficient pass and of a plain read, same tensors in memory.

    On the CPU the seconds are the process's CPU time, so other load on the
    machine does not count; on a GPU they are wall time after a synchronise.
    """
    opened = {}
    timings = {"plain": 0.0, "nan": 0.0}
    total_bytes = 0
    for name, file in _tensor_files(paths[0]):
        handles = []
        for path in paths:
            if (path, file) not in opened:
                opened[(path, file)] = safe_open(str(path / file), framework="pt")
            handles.append(opened[(path, file)])
        tensors = [handle.get_tensor(name).to(device) for handle in handles]
        scratch = torch.empty(tensors[0].shape, dtype=torch.float32, device=device)
        total_bytes += sum(t.numel() * t.element_size() for t in tensors)
        for repeat in range(repeats):
            for which in ("plain", "nan") if repeat % 2 == 0 else ("nan", "plain"):
                function = plain_read if which == "plain" else coefficient_pass
                started = _clock(device)
                function(tensors, scratch)
                timings[which] += _clock(device) - started
        del tensors, scratch
    gigabytes = total_bytes * repeats / 1e9
    return {
        "gigabytes_per_pass": total_bytes / 1e9,
        "plain_s": timings["plain"] / repeats,
        "nan_s": timings["nan"] / repeats,
        "plain_gb_s": gigabytes / timings["plain"],
        "nan_gb_s": gigabytes / timings["nan"],
    }


def probe_peak(paths: Sequence[Path], method: str) -> int:
    """Bytes the peak RSS grows while ``method`` merges the largest tensor (this process).

    Runs the merge kernel through mergekit's in-process API on tensors already
    loaded, so only the kernel's own working set (and NAN's pass) counts.
    """
    import resource

    import mergekit.merge_methods  # noqa: F401  (the plugin registers on import)
    from mergekit.merge_methods.api import merge_tensors

    import mergekit_nan  # noqa: F401

    files = dict(_tensor_files(paths[0]))
    sizes = {}
    for name, file in files.items():
        with safe_open(str(paths[0] / file), framework="pt") as handle:
            sizes[name] = numel(handle.get_slice(name).get_shape())
    name = max(sizes, key=sizes.__getitem__)
    no_base = method.endswith(NO_BASE)
    method = method.removesuffix(NO_BASE)
    tensors = []
    for path in paths[1:] if no_base else paths:
        with safe_open(str(path / files[name]), framework="pt") as handle:
            tensors.append(handle.get_tensor(name).clone())
    parameters = {
        "linear": {"weight": 1.0},
        "nan": {},
        "ties": {"weight": 1.0, "density": DENSITY},
        "dare_ties": {"weight": 1.0, "density": DENSITY},
    }[method.removesuffix("+nan")]
    if method.endswith("+nan"):
        parameters = {k: v for k, v in parameters.items() if k != "weight"}
    base_index = None if method == "linear" or no_base else 0
    torch.manual_seed(RANDOM_SEED)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merge_tensors(tensors, method, parameters=parameters, base_index=base_index, name=name)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024
