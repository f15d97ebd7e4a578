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


_SCALAR_MODELS = 64
"""Up to this many models, one row of coefficients is computed with Python floats."""


def _shares(norms: Sequence[float], exponent: float, prior: Optional[Sequence[float]]) -> list:
    """One row of :func:`coefficients_from_norms` in float64 Python arithmetic."""
    weights = [1.0] * len(norms) if prior is None else [float(w) for w in prior]
    logits = [
        -exponent * math.log(norm) if norm > 0 and weight > 0 else -math.inf
        for norm, weight in zip(norms, weights)
    ]
    informative = any(logit > -math.inf for logit in logits)
    if informative:
        shift = max(logits)
        scores = [w * math.exp(logit - shift) for w, logit in zip(weights, logits)]
    else:
        scores = list(weights)
    total = math.fsum(scores)
    if not (total > 0 and all(weight >= 0 for weight in weights)):
        raise ValueError("NAN priors (weight) must be non-negative and not all zero")
    return [score / total for score in scores]


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
    if norms.dim() == 1 and norms.device.type == "cpu" and norms.numel() <= _SCALAR_MODELS:
        # One tensor's handful of models (the merge's case): plain float64 arithmetic,
        # the same steps as below without a dozen small kernel launches.
        weights = None if prior is None else torch.broadcast_to(prior, norms.shape).tolist()
        shares = _shares(norms.tolist(), exponent, weights)
        return torch.tensor(shares, dtype=torch.float64).to(result_dtype)
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
