"""NAN coefficients: per-input Frobenius norms to normalised merge weights.

This module is the single source of the NAN arithmetic (Si et al., 2025,
arXiv 2505.16148). It is plain torch and imports nothing from mergekit, so the
merge method, the modifier, the CLI and the tests all call the same code; the
norms themselves come from the norm pass (:mod:`mergekit_nan.norms`, whose
:func:`frobenius_norms` is also importable from here).

For inputs x_1..x_n (task vectors or full tensors), exponent p and priors w::

    alpha_i = w_i * ||x_i||_F^(-p) / sum_j w_j * ||x_j||_F^(-p)

Zero-norm rule: an input whose x_i is exactly zero carries no information; its
coefficient is 0 and the others are renormalised. If every x_i is zero the
coefficients fall back to the normalised priors w_i / sum_j w_j (the merge then
returns the base, or the plain average when there is no base).

Norms are accumulated in float32 (float64 for float64 inputs), with
differences to the base formed element-wise in that precision, so no
full-size temporary is allocated and small task vectors do not cancel.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mergekit_nan.norms import (
    NORM_CHUNK_ELEMENTS,
    NonFiniteInputError,
    accumulation_dtype,
    frobenius_norms,
)

__all__ = [
    "NORM_CHUNK_ELEMENTS",
    "NonFiniteInputError",
    "accumulation_dtype",
    "coefficients_from_norms",
    "frobenius_norms",
    "tensor_coefficients",
]


def coefficients_from_norms(
    norms: torch.Tensor,
    *,
    exponent: float = 1.0,
    prior: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Turn norms into NAN coefficients that sum to one.

    ``norms`` has shape ``[..., n]`` (non-negative); ``prior`` broadcasts to
    it (default all ones, non-negative). Computed in log space so extreme norms
    or exponents neither overflow nor underflow; the result has the norms'
    accumulation dtype. Zero norms get coefficient 0;
    rows whose norms are all zero get the normalised prior. A row whose
    weighted sum is zero (all priors zero) raises ``ValueError``.
    """
    if not math.isfinite(exponent):
        raise ValueError(f"nan_exponent must be finite, got {exponent}")
    result_dtype = accumulation_dtype(norms.dtype)
    # A handful of numbers: float64 keeps the log-space round trip exact to
    # float32 output precision (except on backends without float64).
    dtype = torch.float32 if norms.device.type == "mps" else torch.float64
    norms = norms.to(dtype)
    if prior is None:
        prior = torch.ones_like(norms)
    else:
        prior = torch.broadcast_to(prior.to(dtype=dtype, device=norms.device), norms.shape)
    informative = norms > 0
    logits = torch.where(
        informative, -exponent * torch.log(torch.where(informative, norms, 1.0)), -math.inf
    )
    logits = torch.where(prior > 0, logits, -math.inf)
    any_informative = (logits > -math.inf).any(dim=-1, keepdim=True)
    shift = torch.where(any_informative, logits.amax(dim=-1, keepdim=True), 0.0)
    scores = torch.where(
        any_informative,
        prior * torch.exp(logits - shift),
        prior,
    )
    total = scores.sum(dim=-1, keepdim=True)
    if not bool((total > 0).all() & (prior >= 0).all()):
        raise ValueError("NAN priors (weight) must be non-negative and not all zero")
    return (scores / total).to(result_dtype)


def tensor_coefficients(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    exponent: float = 1.0,
    prior: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Norms of ``tensors`` (minus ``base`` when given) to NAN coefficients.

    Returns a 1-D tensor of ``len(tensors)`` coefficients on the inputs' device.
    """
    norms = frobenius_norms(tensors, base)
    weights = (
        None if prior is None else torch.tensor(list(prior), dtype=norms.dtype, device=norms.device)
    )
    if weights is not None and weights.shape != norms.shape:
        raise ValueError(f"expected {norms.numel()} prior weights, got {weights.numel()}")
    return coefficients_from_norms(norms, exponent=exponent, prior=weights)
