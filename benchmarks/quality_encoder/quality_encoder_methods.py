"""The merges mergekit lacks, in plain torch, and the coefficients fed to stock recipes.

Every function returns a merged task vector ``M`` (name -> tensor) at the scale of a mean
of the task vectors ``x_i = theta_i - theta_base``; the benchmark scores ``base + lambda M``
for each ``lambda`` of one grid, the same for every method.

* :func:`iso_c`: Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging
  with Common and Task-Specific Subspaces"). For each 2-D weight, the SVD of the summed task
  vectors ``U S V^T``; every singular value is replaced by their mean over the full rank
  ``min(m, n)`` (a flat spectrum): ``mean(S) U V^T``. Other tensors (biases, LayerNorms):
  the plain sum. Divided by ``T`` (the number of tasks) to put it at mean scale, so the
  paper's ``alpha`` is ``lambda / T``.
* :func:`iso_c` with ``weights``: the same on ``sum_i alpha_i x_i`` (NAN's per-tensor
  coefficients, which sum to one, so no division): Iso-C on NAN's weighted sum.
* :func:`tsv_m`: TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task
  Interference in Model Merging"). For each 2-D weight, each task's SVD ``U_i S_i V_i^T``
  keeps its top ``k = max(1, min(m, n) // T)`` components; the kept left vectors of all
  tasks are stacked side by side (``m x Tk``) and replaced by their polar factor (``P Q^T``
  of the SVD ``P D Q^T`` of the stack: the nearest matrix with orthonormal columns), the
  right vectors the same; the result is ``U_perp blockdiag(S_i) V_perp^T``. Other tensors:
  the plain sum. Divided by ``T`` like Iso-C (the paper's ``alpha = lambda / T``).

Both are applied to every 2-D tensor whose summed task vector is not zero (the word
embeddings no expert trains stay the base's); SVDs run in float64.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_nan import coefficients_from_norms, frobenius_norms

State = Dict[str, torch.Tensor]
_LAYER = re.compile(r"^(encoder\.layer\.\d+\.)")


def task_vectors(base: State, experts: Sequence[State], skip: Sequence[str] = ()) -> List[State]:
    """``theta_i - base`` in float64 for every floating-point tensor but ``skip``."""
    names = [n for n, t in base.items() if t.is_floating_point() and n not in skip]
    return [{n: e[n].double() - base[n].double() for n in names} for e in experts]


def _flat(matrix: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return s.mean() * (u @ vh)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def iso_c(vectors: Sequence[State], weights: Optional[Sequence[State]] = None) -> State:
    """Iso-C's merged task vector at mean scale; with ``weights`` (per model, per tensor
    coefficients summing to one) it flattens ``sum_i w_i x_i`` instead of the plain sum."""
    out = {}
    for name in vectors[0]:
        if weights is None:
            total = sum(v[name] for v in vectors) / len(vectors)
        else:
            total = sum(float(w[name]) * v[name] for v, w in zip(vectors, weights))
        if total.dim() == 2 and bool(total.abs().sum() > 0):
            total = _flat(total)
        out[name] = total
    return out


def tsv_m(vectors: Sequence[State]) -> State:
    """TSV-M's merged task vector at mean scale (see the module docstring)."""
    tasks = len(vectors)
    out = {}
    for name in vectors[0]:
        updates = [v[name] for v in vectors]
        if updates[0].dim() != 2 or not any(bool(u.abs().sum() > 0) for u in updates):
            out[name] = sum(updates) / tasks
            continue
        k = max(1, min(updates[0].shape) // tasks)
        lefts, values, rights = [], [], []
        for update in updates:
            u, s, vh = torch.linalg.svd(update, full_matrices=False)
            lefts.append(u[:, :k])
            values.append(s[:k])
            rights.append(vh[:k].T)
        left, right = _polar(torch.cat(lefts, 1)), _polar(torch.cat(rights, 1))
        out[name] = (left * torch.cat(values)) @ right.T / tasks
    return out


def nan_tensor_weights(vectors: Sequence[State]) -> List[State]:
    """NAN's per-tensor coefficients (p = 1), from the plugin's public functions."""
    per_name = {}
    for name in vectors[0]:
        norms = frobenius_norms([v[name] for v in vectors])
        per_name[name] = coefficients_from_norms(norms).tolist()
    return [{n: c[i] for n, c in per_name.items()} for i in range(len(vectors))]


def group_of(name: str, granularity: str) -> str:
    """The tensors that share one coefficient: the transformer layer, the whole model, or
    (outside the layers at layer granularity, as the plugin does) the tensor itself."""
    if granularity == "model":
        return "*"
    if granularity == "layer":
        match = _LAYER.match(name)
        if match:
            return match.group(1)
    return name


def pooled_weights(vectors: Sequence[State], granularity: str) -> Dict[str, List[float]]:
    """NAN coefficients (p = 1) per group of :func:`group_of`: norms pooled as
    ``sqrt(sum_t ||x_t||^2)`` over the group's tensors, turned into coefficients by the
    plugin's ``coefficients_from_norms``. Returns group -> one coefficient per model."""
    squares: Dict[str, torch.Tensor] = {}
    for name in vectors[0]:
        group = group_of(name, granularity)
        norms = frobenius_norms([v[name] for v in vectors]).double()
        squares[group] = squares.get(group, torch.zeros(len(vectors), dtype=torch.float64))
        squares[group] = squares[group] + norms * norms
    return {g: coefficients_from_norms(s.sqrt()).tolist() for g, s in squares.items()}


def mmcr_weights(experts: Sequence[State]) -> List[float]:
    """MMCR's reading of NAN: one norm per model over every floating-point tensor of the
    FULL fine-tuned weights, ``1 / (norm + 1e-12)`` normalised to sum to one."""
    inverse = []
    for state in experts:
        squares = sum(
            float(t.double().pow(2).sum()) for t in state.values() if t.is_floating_point()
        )
        inverse.append(1.0 / (squares**0.5 + 1e-12))
    return [v / sum(inverse) for v in inverse]


def linear(vectors: Sequence[State], weights: Sequence[float]) -> State:
    """``sum_i w_i x_i`` (one weight per model), in float64."""
    return {n: sum(w * v[n] for w, v in zip(weights, vectors)) for n in vectors[0]}


def apply(base: State, vector: State, lam: float) -> State:
    """``base + lambda * vector`` in float32; tensors the vector lacks keep the base's."""
    return {
        n: (t.double() + lam * vector[n]).to(t.dtype) if n in vector else t for n, t in base.items()
    }
