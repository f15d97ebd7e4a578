"""The merges the quality benchmark compares, all at total weight one and lambda one.

Two kinds, both called as ``merge(base, models, volumes) -> state dict``:

* :class:`MergekitMerge`: a mergekit method (``task_arithmetic``, ``ties``,
  ``nan``, ``ties+nan``) through mergekit's ``merge_state_dicts``, the same
  kernels ``mergekit-yaml`` runs. ``nan`` there is NAN at tensor granularity.
* :class:`GroupedNan`: NAN with one coefficient per model for each group of
  tensors, computed here with plain torch and the plugin's pure math
  (``frobenius_norms``, ``coefficients_from_norms``)::

      ||x_i||_G = sqrt(sum over tensors t in G of ||x_i,t||^2)
      alpha_i   = ||x_i||_G^-1 / sum_j ||x_j||_G^-1
      result_t  = base_t + sum_i alpha_i (theta_i,t - base_t)   for every t in G

  with x_i = theta_i - base (``delta``) or theta_i (``weights``). Granularity
  ``tensor``: every tensor is its own group (what ``nan`` computes); ``layer``:
  one group per Linear module of the benchmark's MLP (its weight and bias);
  ``model``: one group holding every tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import mergekit.merge_methods  # noqa: F401  (mergekit first: the plugin registers on import)
import torch
from mergekit.merge_methods.api import merge_state_dicts

import mergekit_nan  # noqa: F401  (registers nan and <method>+nan)
from mergekit_nan.coefficients import (
    accumulation_dtype,
    coefficients_from_norms,
    frobenius_norms,
)

State = Dict[str, torch.Tensor]

GRANULARITIES: Tuple[str, ...] = ("tensor", "layer", "model")
NAN_READINGS: Tuple[str, ...] = ("delta", "weights")
"""The ``nan_norm`` values whose coefficients are compared with data volume."""


def _uniform(volumes: Sequence[int]) -> List[float]:
    return [1.0 / len(volumes)] * len(volumes)


def _oracle(volumes: Sequence[int]) -> List[float]:
    total = float(sum(volumes))
    return [v / total for v in volumes]


@dataclass(frozen=True)
class MergekitMerge:
    """A mergekit method name plus its parameters given the data volumes."""

    label: str
    name: str
    parameters: Callable[[Sequence[int]], Dict[str, object]]

    def __call__(self, base: State, models: Sequence[State], volumes: Sequence[int]) -> State:
        """Merge ``models`` onto ``base`` through mergekit's in-process API."""
        inputs = {"base": base, **{f"m{i}": m for i, m in enumerate(models)}}
        parameters = self.parameters(volumes)
        weight = parameters.get("weight")
        if isinstance(weight, list):
            parameters = {**parameters, "weight": {f"m{i}": w for i, w in enumerate(weight)}}
        with torch.no_grad():
            return merge_state_dicts(inputs, self.name, parameters=parameters, base="base")


def group_of(name: str, granularity: str) -> str:
    """The group of tensor ``name``: itself, its Linear module (``0.weight`` -> ``0``), or all."""
    if granularity == "tensor":
        return name
    if granularity == "layer":
        return name.rpartition(".")[0]
    if granularity == "model":
        return ""
    raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


@dataclass(frozen=True)
class GroupReading:
    """NAN's reading of one tensor group.

    ``norms[k, i]`` is ||x_i|| of tensor ``tensors[k]``; ``coefficients[i]``
    (summing to one) comes from the group norms sqrt(sum_k norms[k, i]^2).
    """

    tensors: Tuple[str, ...]
    norms: torch.Tensor
    coefficients: torch.Tensor


def read_groups(
    base: State, models: Sequence[State], nan_norm: str, granularity: str
) -> List[GroupReading]:
    """NAN coefficients (p = 1) per group of ``base``'s tensors, in ``base``'s order."""
    if nan_norm not in NAN_READINGS:
        raise ValueError(f"nan_norm must be one of {', '.join(NAN_READINGS)}, got {nan_norm!r}")
    groups: Dict[str, List[str]] = {}
    for name in base:
        groups.setdefault(group_of(name, granularity), []).append(name)
    readings = []
    for names in groups.values():
        norms = torch.stack(
            [
                frobenius_norms([m[t] for m in models], base[t] if nan_norm == "delta" else None)
                for t in names
            ]
        )
        # Squares add up in float64; a group of one gives back its tensor's norm exactly.
        group_norms = norms.double().square().sum(dim=0).sqrt().to(norms.dtype)
        readings.append(GroupReading(tuple(names), norms, coefficients_from_norms(group_norms)))
    return readings


def grouped_nan_merge(
    base: State, models: Sequence[State], nan_norm: str, granularity: str
) -> State:
    """base + sum_i alpha_i (theta_i - base) per tensor, alpha_i from the tensor's group.

    The arithmetic is the ``nan`` method's: (1 - sum c_i) base + sum c_i theta_i
    in float32 (float64 for float64 inputs), with c_i = 0 where a task vector is exactly zero (so such a
    tensor is the base bit for bit); at ``tensor`` granularity the result is
    what ``merge_state_dicts(..., "nan")`` returns.
    """
    merged: State = {}
    with torch.no_grad():
        for reading in read_groups(base, models, nan_norm, granularity):
            shares = reading.coefficients.tolist()
            total = math.fsum(shares)
            for k, name in enumerate(reading.tensors):
                coefficients = [share / total for share in shares]
                if nan_norm == "delta":
                    zero = (reading.norms[k] == 0).tolist()
                    coefficients = [0.0 if z else c for z, c in zip(zero, coefficients)]
                result = torch.zeros_like(base[name], dtype=accumulation_dtype(base[name].dtype))
                result.add_(base[name], alpha=1.0 - math.fsum(coefficients))
                for model, coefficient in zip(models, coefficients):
                    if coefficient != 0:
                        result.add_(model[name], alpha=coefficient)
                merged[name] = result.to(base[name].dtype)
    return merged


@dataclass(frozen=True)
class GroupedNan:
    """NAN (p = 1) at ``layer`` or ``model`` granularity (or ``tensor``, for checks)."""

    label: str
    nan_norm: str
    granularity: str

    def __call__(self, base: State, models: Sequence[State], volumes: Sequence[int]) -> State:
        """Merge ``models`` onto ``base``; ``volumes`` are not used."""
        return grouped_nan_merge(base, models, self.nan_norm, self.granularity)


def merge_recipes(density: float) -> List[Union[MergekitMerge, GroupedNan]]:
    """The merges compared, all at total weight one and lambda one."""
    return [
        MergekitMerge(
            "task arithmetic (uniform)", "task_arithmetic", lambda v: {"weight": _uniform(v)}
        ),
        MergekitMerge(
            "oracle (weight ~ data volume)", "task_arithmetic", lambda v: {"weight": _oracle(v)}
        ),
        MergekitMerge("nan (delta, p=1) [default]", "nan", lambda v: {}),
        MergekitMerge("nan (delta, p=2)", "nan", lambda v: {"nan_exponent": 2.0}),
        MergekitMerge("nan (weights, p=1)", "nan", lambda v: {"nan_norm": "weights"}),
        MergekitMerge(
            "nan (weights, p=2)", "nan", lambda v: {"nan_norm": "weights", "nan_exponent": 2.0}
        ),
        GroupedNan("nan per layer (delta, p=1)", "delta", "layer"),
        GroupedNan("nan per model (delta, p=1)", "delta", "model"),
        GroupedNan("nan per layer (weights, p=1)", "weights", "layer"),
        GroupedNan("nan per model (weights, p=1)", "weights", "model"),
        MergekitMerge("ties (uniform)", "ties", lambda v: {"weight": 1.0, "density": density}),
        MergekitMerge("ties+nan", "ties+nan", lambda v: {"density": density}),
    ]


def summary_coefficients(
    base: State, models: Sequence[State], nan_norm: str, granularity: str
) -> List[float]:
    """Per-model NAN coefficient (p = 1), averaged over the groups of ``granularity``."""
    readings = read_groups(base, models, nan_norm, granularity)
    return torch.stack([r.coefficients for r in readings]).mean(dim=0).tolist()
