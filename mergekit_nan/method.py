"""The ``nan`` merge method: norm-derived coefficients, no hand-tuned weights.

Per output tensor, with non-base inputs theta_i and optional base theta_b::

    x_i     = theta_i - theta_b   (nan_norm auto/delta, with a base)
            = theta_i             (no base, or nan_norm: weights)
    alpha_i = w_i ||x_i||^-p / sum_j w_j ||x_j||^-p       (p = nan_exponent)
    result  = sum_i alpha_i theta_i                              (no base)
            = theta_b + lambda * sum_i alpha_i (theta_i - theta_b)   (base)

Zero-norm inputs get alpha_i = 0; if all are zero the priors decide (the
result is then the base, or the plain average without one). Arithmetic runs in
float32 (float64 for float64 inputs) on the inputs' device.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorEntry,
    TensorGroup,
)

from mergekit_nan.coefficients import NORM_CHUNK_ELEMENTS, accumulation_dtype
from mergekit_nan.group import Weighting, group_weighting
from mergekit_nan.parameters import NAN_EXPONENT, NAN_NORM, finite_float

__all__ = ["NAN_PAPER_URL", "NanMerge", "nan_merge_method"]

NAN_PAPER_URL = "https://arxiv.org/abs/2505.16148"


class NanMerge(GroupMergeMethod):
    """NAN (Si et al., 2025): inverse-norm coefficients for each output tensor."""

    spec = MergeMethodSpec(
        name="nan",
        pretty_name="NAN",
        reference_url=NAN_PAPER_URL,
        parameters=(
            ParameterSpec(
                "weight",
                finite_float("weight", non_negative=True),
                ParameterScope.NON_BASE,
                default=1.0,
                description="prior that multiplies each model's NAN estimate",
            ),
            NAN_EXPONENT,
            NAN_NORM,
            ParameterSpec(
                "lambda",
                finite_float("lambda"),
                ParameterScope.SHARED,
                default=1.0,
                description="scale of the merged task vector (with a base)",
            ),
        ),
        contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=2, min_non_base=1),
        # An optional weight (e.g. an untied lm_head) that only one input has is copied.
        optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_SINGLETON,
    )

    def weighting(self, group: TensorGroup, parameters: Mapping[str, Any]) -> Weighting:
        """The alpha_i of ``group`` (bound parameters), with ``lambda`` as the scale."""
        prior: PerInputValues[float] = parameters["weight"]
        return group_weighting(
            group,
            group.non_base,
            nan_norm=parameters["nan_norm"],
            exponent=parameters["nan_exponent"],
            prior=prior,
            scale=parameters["lambda"] if group.base is not None else 1.0,
            scales_weights=False,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        inputs = group.non_base
        weighting = self.weighting(group, parameters)
        scale = weighting.scale
        scaled = [scale * share for share in weighting.shares]
        first = inputs[0].tensor
        dtype = accumulation_dtype(first.dtype)
        if group.base is None:
            result = torch.zeros_like(first, dtype=dtype)
            for entry, coefficient in zip(inputs, scaled):
                result.add_(entry.tensor, alpha=coefficient)
        else:
            result = _add_task_vectors(group.base.tensor, inputs, scaled, dtype)
        merged = result.to(first.dtype)
        if not 0 <= scale <= 1 and not bool(torch.isfinite(merged).all()):
            # Only an extrapolating lambda can leave the inputs' range.
            raise OverflowError(
                f"merged tensor {group.metadata.name!r} overflows {first.dtype} with "
                f"lambda={scale}; lower lambda or merge in a wider dtype"
            )
        return merged


def _add_task_vectors(
    base: torch.Tensor,
    inputs: Sequence[TensorEntry],
    coefficients: Sequence[float],
    dtype: torch.dtype,
    chunk: int = NORM_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """theta_b + sum_i c_i (theta_i - theta_b) in ``dtype``, chunk by chunk.

    Differences are formed in ``dtype``, so a zero task vector adds exactly
    nothing (unchanged tensors stay bit-identical) and small ones do not
    cancel; temporaries never exceed ``chunk`` elements.
    """
    result = torch.empty(base.shape, dtype=dtype, device=base.device)
    result.copy_(base)
    flat = result.view(-1)
    flat_inputs = [
        (entry.tensor.reshape(-1), c) for entry, c in zip(inputs, coefficients) if c != 0
    ]
    if not flat_inputs:
        return result
    for start in range(0, flat.numel(), chunk):
        length = min(chunk, flat.numel() - start)
        out = flat.narrow(0, start, length)
        base_part = out.clone()  # theta_b in ``dtype``, before any update
        for tensor, coefficient in flat_inputs:
            out.add_(torch.sub(tensor.narrow(0, start, length), base_part), alpha=coefficient)
    return result


nan_merge_method = NanMerge()
