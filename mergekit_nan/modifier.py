"""``nan_coefficients``: NAN weights for any mergekit method that takes ``weight``.

``nan_coefficients(get("ties"))`` is a method named ``ties+nan`` whose spec is
the inner spec (contract, policies, defaults, validation) with ``weight`` made
optional and ``nan_exponent``/``nan_norm`` added. Per tensor it computes NAN
coefficients from the group (task vectors when the inner method is base-aware
and a base is present, the tensors themselves otherwise), puts them in place
of ``weight`` and calls the inner method through its public call. Nothing of
the inner method is re-implemented; random draws (DARE, DELLA) are the inner
method's own, so a fixed seed gives the same masks as the stock method.

Scale rule: NAN sets the ratios between models; their total is the sum of the
user's ``weight`` values for the tensor when given, else 1. Example: a
task_arithmetic recipe with ``weight: 1.0`` on two models whose task vectors
have norms 1 and 3 gets weights 2 * (3/4, 1/4) = (1.5, 0.5).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    PerInputValues,
    TensorGroup,
)

from mergekit_nan.errors import TensorError
from mergekit_nan.measure import MeasurableMethod, record
from mergekit_nan.method import NAN_PAPER_URL
from mergekit_nan.parameters import NAN_EXPONENT, NAN_GRANULARITY, NAN_NORM, optional
from mergekit_nan.weighting import Weighting, group_weighting, weight_total

__all__ = ["COMPOSITE_SUFFIX", "NanCoefficients", "nan_coefficients", "takes_weight"]

COMPOSITE_SUFFIX = "+nan"
_NAN_PARAMETERS = (NAN_EXPONENT.name, NAN_NORM.name, NAN_GRANULARITY.name)


def takes_weight(method: MergeMethod) -> bool:
    """Whether ``method`` declares a per-input or per-non-base ``weight``."""
    return any(
        p.name == "weight" and p.scope != ParameterScope.SHARED for p in method.spec.parameters
    )


class NanCoefficients(MeasurableMethod):
    """``inner`` with its ``weight`` values replaced by NAN coefficients."""

    def __init__(self, inner: MergeMethod):
        if isinstance(inner, NanCoefficients):
            raise ValueError(f"{inner.spec.name} already uses NAN coefficients")
        if not takes_weight(inner):
            raise ValueError(
                f"merge method {inner.spec.name!r} has no per-model weight "
                "parameter, so NAN has nothing to set"
            )
        clashes = {p.name for p in inner.spec.parameters} & set(_NAN_PARAMETERS)
        if clashes:
            raise ValueError(f"merge method {inner.spec.name!r} already declares {sorted(clashes)}")
        self.inner = inner
        parameters = tuple(optional(p) if p.name == "weight" else p for p in inner.spec.parameters)
        self.spec = MergeMethodSpec(
            name=inner.spec.name + COMPOSITE_SUFFIX,
            parameters=parameters + (NAN_EXPONENT, NAN_NORM, NAN_GRANULARITY),
            contract=inner.spec.contract,
            pretty_name=f"{inner.spec.pretty_name or inner.spec.name} with NAN coefficients",
            reference_url=NAN_PAPER_URL,
            optional_tensor_policy=inner.spec.optional_tensor_policy,
            uses_accelerator=inner.spec.uses_accelerator,
        )
        self._weight_scope = next(p.scope for p in inner.spec.parameters if p.name == "weight")

    def weighting(
        self, group: TensorGroup, parameters: Mapping[str, Any], moments: bool = False
    ) -> Optional[Weighting]:
        """The ``weight`` values for ``group`` (bound parameters); None if only a base.

        Raises for ``nan_norm: delta`` on a base-ignoring method and for weights
        given for some models but not all.
        """
        nan_norm = parameters[NAN_NORM.name]
        if self.inner.spec.contract.base == BasePolicy.IGNORED:
            if nan_norm == "delta":
                raise TensorError(
                    f"{self.inner.spec.name} ignores the base model, so nan_norm: "
                    f"delta is undefined for tensor {group.metadata.name!r}; use "
                    "nan_norm: weights or a base-aware method"
                )
            nan_norm = "weights"
        inputs = group.entries if self._weight_scope == ParameterScope.INPUT else group.non_base
        if not inputs:
            return None
        user: PerInputValues[Optional[float]] = parameters["weight"]
        total = weight_total(
            self.spec.name,
            group.metadata.name,
            [(entry.id, user[entry.id]) for entry in inputs],
            inputs[0].tensor.dtype,
        )
        return group_weighting(
            group,
            inputs,
            nan_norm=nan_norm,
            exponent=parameters[NAN_EXPONENT.name],
            scale=total,
            scales_weights=True,
            moments=moments,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        weighting = self.weighting(group, parameters)
        inner = {k: v for k, v in parameters.items() if k not in _NAN_PARAMETERS}
        if weighting is not None:
            record(group, weighting)
            inner["weight"] = dict(zip(weighting.models, weighting.weights))
        # With only a base (an optional tensor the others lack) there is nothing
        # to weigh: the inner method decides (the task-arithmetic family returns it).
        (result,) = self.inner((group,), parameters=inner)
        return result


def nan_coefficients(method: MergeMethod) -> MergeMethod:
    """Wrap a weight-taking mergekit method so NAN chooses its ``weight`` values.

    The result is named ``<name>+nan``; register it with
    ``mergekit.merge_methods.register`` to use it from YAML.
    """
    return NanCoefficients(method)
