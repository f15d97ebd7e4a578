"""LoRA factor arithmetic: norms, merges and truncations of ``s * B @ A`` without the product.

A LoRA module's update is ``delta = s * B @ A`` with ``B`` of shape ``[m, r]``,
``A`` of shape ``[r, n]`` and the adapter's scaling ``s``. Everything here works
on the factors alone, so the ``m x n`` product is never formed:

* ``||s B A||_F^2 = s^2 * sum((B^T B) * (A A^T))``: two ``r x r`` Gram matrices
  (:func:`factor_norm`), and the sum of the elements of ``delta`` is
  ``s * (1^T B)(A 1)`` (:func:`factor_sum`);
* ``sum_i c_i B_i A_i = [c_1 B_1 | ... | c_k B_k] @ [A_1; ...; A_k]``: a weighted
  sum of updates is one LoRA module whose rank is the sum of the ranks, with each
  coefficient folded into its ``B`` block (:func:`concatenate`);
* the best rank-``R`` approximation of ``B @ A`` (``k`` = its rank) comes from
  QR decompositions of ``B`` and ``A^T`` and the SVD of the ``k x k`` product
  of their triangular factors (:func:`truncate`), which also gives the
  fraction of the Frobenius norm the truncation keeps.

Plain torch; norms, sums and truncations are computed in float64, on one CPU
thread: the products are small (``r x r``, ``m x r``), so a second thread gains
nothing, and on busy cores its barrier waits made them 20-50x slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from mergekit_nan.worker_pool import one_thread

__all__ = ["Truncation", "concatenate", "factor_norm", "factor_sum", "truncate"]


def _check(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"LoRA factors must be B [m, r] and A [r, n]; got {tuple(b.shape)} and {tuple(a.shape)}"
        )


def factor_norm(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> float:
    """``||scale * b @ a||_F`` from the ``r x r`` Gram matrices, in float64."""
    _check(b, a)
    with one_thread():
        b64, a64 = b.to(torch.float64), a.to(torch.float64)
        square = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    # The Gram product is a sum of squares up to rounding: never below zero.
    return abs(scale) * math.sqrt(max(square, 0.0))


def factor_sum(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> float:
    """The sum of the elements of ``scale * b @ a``, in float64."""
    _check(b, a)
    with one_thread():
        return scale * float(b.to(torch.float64).sum(dim=0) @ a.to(torch.float64).sum(dim=1))


def concatenate(
    terms: Sequence[Tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` of ``sum_k c_k * b_k @ a_k`` over ``terms = [(b_k, a_k, c_k)]``.

    ``B = [c_1 b_1 | c_2 b_2 | ...]`` and ``A = [a_1; a_2; ...]``, both in
    ``dtype``; each product ``c_k * b_k`` is formed in float64 and rounded once.
    """
    if not terms:
        raise ValueError("concatenate needs at least one LoRA term")
    for b, a, _ in terms:
        _check(b, a)
    with one_thread():
        b = torch.cat([c * b.to(torch.float64) for b, _, c in terms], dim=1)
        a = torch.cat([a.to(torch.float64) for _, a, _ in terms], dim=0)
        return b.to(dtype), a.to(dtype)


@dataclass(frozen=True)
class Truncation:
    """A rank-truncated update ``b @ a`` and what it keeps of the original.

    ``retained`` is ``||b @ a||_F / ||B @ A||_F`` (1 for a zero update);
    ``error`` is ``||B @ A - b @ a||_F / ||B @ A||_F`` (0 for a zero update);
    ``retained^2 + error^2 = 1``.
    """

    b: torch.Tensor
    a: torch.Tensor
    retained: float
    error: float


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> Truncation:
    """The best rank-``rank`` approximation of ``b @ a`` in Frobenius norm, as factors.

    With ``b = Q_b R_b`` and ``a^T = Q_a R_a`` (reduced QR), ``b @ a = Q_b (R_b R_a^T)
    Q_a^T``; the SVD ``U S V^T`` of the small core gives the new factors
    ``Q_b U_R S_R`` and ``V_R^T Q_a^T`` (Eckart-Young). Computed in float64;
    the factors come back in ``b``'s dtype. A rank at or above ``b``'s
    column count returns the factors unchanged.
    """
    _check(b, a)
    if rank < 1:
        raise ValueError(f"rank must be at least 1; got {rank}")
    if rank >= b.shape[1]:
        return Truncation(b, a, 1.0, 0.0)
    with one_thread():
        q_b, r_b = torch.linalg.qr(b.to(torch.float64))
        q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        new_b = (q_b @ u[:, :rank]) * s[:rank]
        new_a = vh[:rank] @ q_a.T
    squares = s.square()
    total = float(squares.sum())
    kept = float(squares[:rank].sum())
    if total > 0:
        retained = math.sqrt(kept / total)
        error = math.sqrt(max(total - kept, 0.0) / total)
    else:
        retained, error = 1.0, 0.0
    return Truncation(new_b.to(b.dtype), new_a.to(b.dtype), retained, error)
