"""Measurement mode: mergekit's own merge adapter, NAN coefficients out instead of tensors.

``mergekit-nan inspect`` must report exactly the coefficients a merge would
use, so it runs the planner's ``ExecuteMergeMethodTask`` itself, unchanged:
mergekit's optional-tensor policy, input validation, non-floating buffer
copies, parameter binding and dtype choice all stay mergekit's. Inside
:func:`measuring`, a :class:`MeasurableMethod` answers the adapter's call with
its :class:`~mergekit_nan.weighting.Weighting` for each group where it would merge.
Outside it, nothing changes. The adapter passes the value through, so a task
then yields a ``Weighting`` (NAN weighed the tensor), a tensor (mergekit
copied or passed it through without NAN) or None (mergekit skips it).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import BatchOptions, GroupMergeMethod, TensorGroup
from mergekit.merge_methods.dtype import align_dtype, promoted_dtype

from mergekit_nan.weighting import Weighting

__all__ = ["MeasurableMethod", "measuring"]

_MEASURING: ContextVar[bool] = ContextVar("mergekit_nan_measuring", default=False)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Within this block, NAN methods called by mergekit's adapter return weightings."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


class MeasurableMethod(GroupMergeMethod):
    """A group method that can report its coefficients instead of merging."""

    def weighting(self, group: TensorGroup, parameters: Mapping[str, Any]) -> Optional[Weighting]:
        """The coefficients for ``group`` with bound ``parameters`` (None: nothing to weigh)."""
        raise NotImplementedError

    def _execute_resolved(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        *,
        dtype: Optional[torch.dtype] = None,
        out_dtype: Optional[torch.dtype] = None,
        batch_options: Optional[BatchOptions] = None,
    ) -> Tuple[Any, ...]:
        if not _MEASURING.get():
            return super()._execute_resolved(
                groups, parameters, dtype=dtype, out_dtype=out_dtype, batch_options=batch_options
            )
        # The dtype the merge would compute in, as GroupMergeMethod aligns it.
        return tuple(
            self.weighting(align_dtype(group, dtype or promoted_dtype(group)), bound)
            for group, bound in zip(groups, parameters)
        )
