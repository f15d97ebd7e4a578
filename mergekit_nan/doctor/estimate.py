"""The size of a merge job, from safetensors headers and mergekit's plan alone.

:func:`estimate_job` adds up, without reading any tensor data:

* **bytes to read**: the stored size of every input tensor the plan reads,
  each (model, tensor) counted once however many slices use it; pickled
  (``pytorch_model.bin``) models count with their file sizes;
* **output size**: per output tensor, its element count (from the base
  model's header, else the first input's) times the output dtype's size:
  the tensor's forced dtype, else the recipe's ``out_dtype``, else its
  ``dtype``, else the widest stored dtype among the tensor's inputs (non-float
  tensors keep their stored dtype);
* **largest tensor**: the output tensor with the most elements;
* **peak memory** of the merge step, per output tensor t with k_t inputs and
  n_t elements: ``k_t * n_t * bytes(compute dtype) + n_t * bytes(output dtype)``,
  maximised over the tensors (all inputs of one tensor are held at once, plus
  its result). The compute dtype is the recipe's ``dtype``, else the widest
  stored dtype of the inputs. mergekit's executor may hold a few tensors more
  while it streams the next ones in, so this is a lower bound of the process's
  peak, not including the Python process itself;
* **free disk** at ``out_path`` (its nearest existing parent), when given.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from mergekit.common import ModelReference

from mergekit_nan.doctor.findings import Finding
from mergekit_nan.doctor.model_files import ModelFacts, PlannedTensor
from mergekit_nan.doctor.safetensors_header import TensorHeader, dtype_size

__all__ = ["Estimate", "LargestTensor", "estimate_job", "format_bytes"]


def format_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class LargestTensor:
    name: str
    shape: Tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Estimate:
    """The job's size; ``None`` where the plan or the headers could not tell.

    ``stored_dtypes`` are the input dtypes on disk, ``compute_dtype`` the
    recipe's ``dtype`` (None: each tensor computes in its inputs' widest
    dtype), ``output_dtype`` the recipe's ``out_dtype`` or ``dtype``.
    ``free_bytes`` is the free space at ``out_path``'s nearest existing parent.
    """

    stage: Optional[str]
    models: int
    read_bytes: int
    stored_dtypes: Tuple[str, ...]
    compute_dtype: Optional[str]
    output_dtype: Optional[str]
    output_tensors: Optional[int]
    output_bytes: Optional[int]
    largest: Optional[LargestTensor]
    peak_bytes: Optional[int]
    out_path: Optional[str] = None
    free_bytes: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    def finding(self) -> Finding:
        """The ``info`` finding that states the estimate in one sentence."""
        stored = "/".join(self.stored_dtypes) or "unknown dtype"
        conversion = f", computed in {self.compute_dtype}" if self.compute_dtype else ""
        parts = [
            f"reads {format_bytes(self.read_bytes)} from {self.models} "
            f"model{'' if self.models == 1 else 's'} "
            f"({stored} on disk{conversion})"
        ]
        if self.output_bytes is not None:
            parts.append(
                f"writes {format_bytes(self.output_bytes)} ({self.output_tensors} tensors"
                + (f", {self.output_dtype}" if self.output_dtype else "")
                + ")"
            )
        if self.largest is not None:
            parts.append(
                f"largest tensor {self.largest.name} {list(self.largest.shape)} "
                f"({format_bytes(self.largest.nbytes)})"
            )
        if self.peak_bytes is not None:
            parts.append(f"merge peak memory about {format_bytes(self.peak_bytes)}")
        if self.free_bytes is not None:
            parts.append(f"{format_bytes(self.free_bytes)} free at {self.out_path}")
        return Finding("info", "estimate", "", "Estimate: " + "; ".join(parts) + ".")

    def disk_findings(self) -> List[Finding]:
        """``disk-space`` error when the output will not fit at ``out_path``."""
        if self.free_bytes is None or self.output_bytes is None:
            return []
        if self.output_bytes <= self.free_bytes:
            return []
        return [
            Finding(
                "error",
                "disk-space",
                "",
                f"the merged model needs about {format_bytes(self.output_bytes)} but only "
                f"{format_bytes(self.free_bytes)} is free at {self.out_path}.",
                "free some space or choose another output directory",
            )
        ]


def _output_size(
    tensor: PlannedTensor, headers: Sequence[TensorHeader], out_dtype: Optional[str]
) -> int:
    """Bytes per element of the merged tensor (see the module docstring)."""
    if tensor.force_dtype:
        return dtype_size(tensor.force_dtype)
    if not all(h.is_float for h in headers):
        return headers[0].itemsize
    return dtype_size(out_dtype) if out_dtype else max(h.itemsize for h in headers)


def free_space(path: str) -> int:
    """Free bytes on the disk that holds ``path`` or, if it does not exist yet, its parent."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def estimate_job(
    planned: Optional[Sequence[PlannedTensor]],
    models: Mapping[ModelReference, ModelFacts],
    *,
    dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
    out_path: Optional[str] = None,
    stage: Optional[str] = None,
) -> Estimate:
    """Estimate the job (see the module docstring); ``planned`` None: no plan, reads only."""
    weights = [m for m in models.values() if m.usable and not m.tokenizer_only]
    read: Set[Tuple[ModelReference, str]] = set()
    read_bytes = sum(m.weight_bytes for m in weights if m.tensors is None)
    stored: Set[str] = set()
    if planned is None:
        for model in weights:
            for name, header in (model.tensors or {}).items():
                read.add((model.reference, name))
                read_bytes += header.nbytes
                stored.add(header.dtype)
    output_bytes = 0
    largest: Optional[LargestTensor] = None
    largest_numel = -1
    peak = 0
    for tensor in planned or ():
        present = []
        held = 0  # inputs the merge holds: those with this tensor, or of unknown contents
        for model, names in tensor.inputs:
            facts = models.get(model)
            header = facts.header(names) if facts is not None else None
            held += header is not None or facts is None or facts.tensors is None
            if facts is None or header is None:
                continue
            present.append((model, header))
            key = (model, next(n for n in names if n in (facts.tensors or {})))
            if key not in read:
                read.add(key)
                read_bytes += header.nbytes
                stored.add(header.dtype)
        if not present:
            continue
        headers = [header for _, header in present]
        reference = next((h for m, h in present if m == tensor.base), headers[0])
        numel = reference.numel
        out_size = _output_size(tensor, headers, out_dtype or dtype)
        compute = (
            dtype_size(dtype) if dtype and reference.is_float else max(h.itemsize for h in headers)
        )
        output_bytes += numel * out_size
        peak = max(peak, held * numel * compute + numel * out_size)
        if numel > largest_numel:
            largest_numel = numel
            largest = LargestTensor(tensor.name, reference.shape, numel * out_size)
    free = free_space(out_path) if out_path is not None else None
    return Estimate(
        stage=stage,
        models=len(weights),
        read_bytes=read_bytes,
        stored_dtypes=tuple(sorted(d for d in stored if d)),
        compute_dtype=dtype,
        output_dtype=out_dtype or dtype,
        output_tensors=None if planned is None else len(planned),
        output_bytes=None if planned is None else output_bytes,
        largest=largest,
        peak_bytes=None if planned is None else peak,
        out_path=out_path,
        free_bytes=free,
    )
