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
import threading
from typing import Any, Mapping, Optional, Sequence, Tuple

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
from mergekit_nan.norms import plan_norm_pass
from mergekit_nan.parameters import NAN_EXPONENT, NAN_GRANULARITY, NAN_NORM, finite_float
from mergekit_nan.weighting import Weighting, check_scale, group_weighting
from mergekit_nan.worker_pool import run_windows

__all__ = ["NAN_PAPER_URL", "NanMerge", "nan_merge_method", "weighted_sum"]

NAN_PAPER_URL = "https://arxiv.org/abs/2505.16148"

SUM_WINDOW_ELEMENTS = 1 << 18
"""Elements converted at once by :func:`weighted_sum` on the CPU (a 1 MiB float32 buffer)."""

_WINDOWS = threading.local()


def _window() -> torch.Tensor:
    """This thread's float32 conversion buffer, allocated once and kept (no allocator churn)."""
    window = getattr(_WINDOWS, "buffer", None)
    if window is None:
        window = _WINDOWS.buffer = torch.empty(SUM_WINDOW_ELEMENTS, dtype=torch.float32)
    return window


def weighted_sum(result: torch.Tensor, terms: Sequence[Tuple[torch.Tensor, float]]) -> None:
    """Write ``sum_k c_k * t_k`` over ``terms`` into ``result``, term by term in that order.

    The floats are those of ``result.zero_()`` followed by ``result.add_(t_k, alpha=c_k)``
    for every term. On the CPU, where a kernel that mixes dtypes first copies the odd
    operand into a temporary as large as the tensor, half-precision terms are converted
    a cache-sized window at a time into a kept buffer instead, and the first term is
    written rather than added to zeros: every input is read once and nothing is allocated.
    Large tensors are shared out window by window between worker threads, as in the
    norm pass (:func:`~mergekit_nan.worker_pool.run_windows`); every element's floats are the
    same whichever thread computes them.
    """
    if not terms:
        result.zero_()
        return
    if result.device.type != "cpu" or result.dtype != torch.float32:
        result.zero_()
        for tensor, coefficient in terms:
            result.add_(tensor, alpha=coefficient)
        return
    flat = result.view(-1)
    sources = [(tensor.reshape(-1), coefficient) for tensor, coefficient in terms]

    def sum_window(worker: int, start: int) -> None:
        length = min(SUM_WINDOW_ELEMENTS, flat.numel() - start)
        target = flat.narrow(0, start, length)
        for index, (source, coefficient) in enumerate(sources):
            part = source.narrow(0, start, length)
            if part.dtype != torch.float32:
                part = _window().narrow(0, 0, length).copy_(part)
            if index == 0:
                torch.mul(part, coefficient, out=target)
            else:
                target.add_(part, alpha=coefficient)

    # The windows are shared out like the norm pass's: kernels on one thread
    # each, so none waits at a thread barrier on busy cores.
    threads = torch.get_num_threads()
    plan = plan_norm_pass("cpu", flat.numel(), threads=threads, chunk=SUM_WINDOW_ELEMENTS)
    starts = range(0, flat.numel(), SUM_WINDOW_ELEMENTS)
    run_windows(starts, sum_window, plan.workers, result.device)


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
            check_scale(group.metadata.name, "lambda", parameters["lambda"], dtype, nonzero=False)
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
        coefficients = weighting.update_coefficients()
        terms = [(entry.tensor, c) for entry, c in zip(inputs, coefficients) if c != 0]
        if group.base is not None:
            # theta_b + sum c_i (theta_i - theta_b) = (1 - sum c_i) theta_b + sum c_i theta_i
            terms.insert(0, (group.base.tensor, 1.0 - math.fsum(coefficients)))
        weighted_sum(result, terms)
        merged = result.to(first.dtype)
        if not 0 <= scale <= 1 and not bool(torch.isfinite(merged).all()):
            # Only an extrapolating lambda can leave the inputs' range.
            raise TensorOverflowError(
                f"merged tensor {group.metadata.name!r} overflows {first.dtype} with "
                f"lambda={scale}; lower lambda or merge in a wider dtype"
            )
        return merged


nan_merge_method = NanMerge()
