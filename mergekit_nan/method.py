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

import math
from typing import Any, Mapping, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_nan.coefficients import accumulation_dtype
from mergekit_nan.errors import TensorOverflowError
from mergekit_nan.measure import MeasurableMethod, record
from mergekit_nan.parameters import NAN_EXPONENT, NAN_GRANULARITY, NAN_NORM, finite_float
from mergekit_nan.weighting import Weighting, check_scale, group_weighting, uses_base

__all__ = ["NAN_PAPER_URL", "NanMerge", "nan_merge_method"]

NAN_PAPER_URL = "https://arxiv.org/abs/2505.16148"


class NanMerge(MeasurableMethod):
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
            NAN_GRANULARITY,
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

    def weighting(
        self,
        group: TensorGroup,
        parameters: Mapping[str, Any],
        scratch: Optional[torch.Tensor] = None,
        moments: bool = False,
    ) -> Weighting:
        """The alpha_i of ``group`` (bound parameters), with ``lambda`` as the scale."""
        prior: PerInputValues[float] = parameters["weight"]
        if group.base is not None:
            dtype = accumulation_dtype(group.base.tensor.dtype)
            check_scale(group, "lambda", parameters["lambda"], dtype, nonzero=False)
        return group_weighting(
            group,
            group.non_base,
            nan_norm=parameters["nan_norm"],
            exponent=parameters["nan_exponent"],
            prior=prior,
            scale=parameters["lambda"] if group.base is not None else 1.0,
            scales_weights=False,
            scratch=scratch,
            moments=moments,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        inputs = group.non_base
        first = inputs[0].tensor
        # The output buffer doubles as the norm pass's working memory, so the
        # method allocates what mergekit's linear kernel allocates, no more.
        result = torch.empty(
            first.shape, dtype=accumulation_dtype(first.dtype), device=first.device
        )
        weighting = self.weighting(group, parameters, scratch=result)
        record(group, weighting)
        scale = weighting.scale
        total = math.fsum(weighting.shares)
        coefficients = [scale * share / total for share in weighting.shares]
        if uses_base(group, parameters["nan_norm"]):
            # A zero task vector adds exactly nothing: tensors no fine-tune
            # touched come out bit-identical to the base.
            coefficients = [0.0 if n == 0 else c for n, c in zip(weighting.norms, coefficients)]
        result.zero_()
        if group.base is not None:
            # theta_b + sum c_i (theta_i - theta_b) = (1 - sum c_i) theta_b + sum c_i theta_i:
            # one pass per input, no temporaries (as mergekit's linear kernel).
            result.add_(group.base.tensor, alpha=1.0 - math.fsum(coefficients))
        for entry, coefficient in zip(inputs, coefficients):
            if coefficient != 0:
                result.add_(entry.tensor, alpha=coefficient)
        merged = result.to(first.dtype)
        if not 0 <= scale <= 1 and not bool(torch.isfinite(merged).all()):
            # Only an extrapolating lambda can leave the inputs' range.
            raise TensorOverflowError(
                f"merged tensor {group.metadata.name!r} overflows {first.dtype} with "
                f"lambda={scale}; lower lambda or merge in a wider dtype"
            )
        return merged


nan_merge_method = NanMerge()
