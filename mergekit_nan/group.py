"""NAN coefficients for one mergekit tensor group, with errors that name names.

The adapters (``nan`` and ``<method>+nan``) call :func:`group_coefficients`;
it picks x_i per the ``nan_norm`` rule, calls the pure math in
:mod:`mergekit_nan.coefficients`, and turns its errors into messages that
name the tensor and the model.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from mergekit.merge_methods.base import TensorEntry, TensorGroup

from mergekit_nan.coefficients import (
    NonFiniteInputError,
    coefficients_from_norms,
    frobenius_norms,
)
from mergekit_nan.parameters import NanNorm

__all__ = ["group_coefficients", "uses_base"]


def _label(group: TensorGroup) -> str:
    return repr(group.metadata.name) if group.metadata.name else "(unnamed tensor)"


def uses_base(group: TensorGroup, nan_norm: NanNorm) -> bool:
    """Whether x_i are task vectors for this group; ``delta`` without a base raises."""
    if nan_norm == "delta" and group.base is None:
        raise ValueError(
            f"nan_norm: delta needs a base model, but tensor {_label(group)} has "
            f"none (models: {', '.join(str(e.id) for e in group.entries)}); set "
            "base_model or use nan_norm: weights"
        )
    return group.base is not None and nan_norm != "weights"


def group_coefficients(
    group: TensorGroup,
    inputs: Sequence[TensorEntry],
    *,
    nan_norm: NanNorm,
    exponent: float,
    prior: Optional[Mapping[object, float]] = None,
) -> torch.Tensor:
    """NAN coefficients (summing to one) for ``inputs``, a subset of ``group``.

    x_i is ``input - base`` when :func:`uses_base`, else the input itself.
    The result is a 1-D tensor on the inputs' device, in float32 (float64 for
    float64 inputs). ``prior`` maps input ids to non-negative weights.
    """
    for entry in group.entries:
        if not entry.tensor.is_floating_point():
            raise TypeError(
                f"NAN needs floating-point tensors; tensor {_label(group)} of "
                f"model {entry.id} is {entry.tensor.dtype}"
            )
    base = group.base.tensor if uses_base(group, nan_norm) else None
    try:
        norms = frobenius_norms([entry.tensor for entry in inputs], base)
    except NonFiniteInputError as error:
        models = [str(inputs[index].id) for index in error.indices]
        if error.base:
            models.append(f"{group.base.id} (base)")
        raise ValueError(
            f"NaN or Inf values in tensor {_label(group)} of model(s) "
            f"{', '.join(models)}; NAN coefficients are undefined"
        ) from None
    weights = None
    if prior is not None:
        weights = torch.tensor(
            [prior[entry.id] for entry in inputs], dtype=norms.dtype, device=norms.device
        )
    try:
        return coefficients_from_norms(norms, exponent=exponent, prior=weights)
    except ValueError as error:
        raise ValueError(f"{error} (tensor {_label(group)})") from None
