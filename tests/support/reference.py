"""The suite's one float64 NAN reference, written out from ``docs/recipes.md``.

For fine-tuned tensors θ_i and an optional base θ_b, x_i is the task vector
θ_i − θ_b (θ_i itself without a base or with ``nan_norm: weights``) and

    α_i = w_i · ‖x_i‖_F^(−p) / Σ_j w_j · ‖x_j‖_F^(−p)

with ``p`` the ``nan_exponent`` and ``w_i`` the per-model prior (``weight``).
Zero-norm rule: an input whose x_i is exactly zero gets α_i = 0; if every x_i
is zero the α fall back to the normalised priors. The merge is Σ α_i θ_i
without a base and θ_b + λ · Σ α_i (θ_i − θ_b) with one.

Everything here is float64 and independent of the plugin: tests compare the
plugin's float32 results against it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

TOLERANCE = 2e-6
"""Max relative error of a float32 merge against this reference: float32 rounding of the
coefficients, nothing more."""


def task_vector_norm(tensor: torch.Tensor, base: Optional[torch.Tensor] = None) -> float:
    """‖θ − θ_b‖_F (‖θ‖_F without a base) in float64."""
    x = tensor.double() - (base.double() if base is not None else 0.0)
    return math.sqrt(float((x * x).sum()))


def nan_alphas(
    norms: Sequence[float], priors: Optional[Sequence[float]] = None, exponent: float = 1.0
) -> List[float]:
    """α_i from the norms ‖x_i‖, the priors w_i (all 1 by default) and the exponent p."""
    priors = list(priors) if priors else [1.0] * len(norms)
    scores = [w * n ** (-exponent) if n > 0 else 0.0 for w, n in zip(priors, norms)]
    if sum(scores) == 0:
        scores = priors
    total = sum(scores)
    return [s / total for s in scores]


def nan_weights(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    priors: Optional[Sequence[float]] = None,
    exponent: float = 1.0,
    total: float = 1.0,
) -> List[float]:
    """``total`` · α_i of ``tensors`` (task vectors against ``base`` when given)."""
    norms = [task_vector_norm(t, base) for t in tensors]
    return [total * a for a in nan_alphas(norms, priors, exponent)]


def nan_merge(
    tuned: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    priors: Optional[Sequence[float]] = None,
    exponent: float = 1.0,
    lam: float = 1.0,
    norm: str = "auto",
    norms: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """The float64 ``nan`` merge of one tensor.

    ``norm="weights"`` takes the norms of θ_i even with a base (``nan_norm:
    weights``); ``norms`` replaces the norms altogether (pooled at a coarser
    granularity, say).
    """
    tuned = [t.double() for t in tuned]
    base = base.double() if base is not None else None
    if norms is None:
        by = base if norm != "weights" else None
        norms = [task_vector_norm(t, by) for t in tuned]
    alpha = nan_alphas(norms, priors, exponent)
    if base is None:
        return sum(a * t for a, t in zip(alpha, tuned))
    return base + lam * sum(a * (t - base) for a, t in zip(alpha, tuned))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in float64."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def report(label: str, error: float, record_property) -> None:
    """Record a test's worst relative error (``record_property``) and print it."""
    record_property("max_relative_error", error)
    print(f"\n  max relative error, {label}: {error:.2e}")
