"""Measurement mode: mergekit's own merge adapter, NAN coefficients out instead of tensors.

``mergekit-nan inspect`` must report exactly the coefficients a merge would
use, so it runs the planner's ``ExecuteMergeMethodTask`` itself, unchanged:
mergekit's optional-tensor policy, input validation, non-floating buffer
copies, parameter binding and dtype choice all stay mergekit's. Inside
:func:`measuring`, a :class:`MeasurableMethod` answers the adapter's call with
its :class:`~mergekit_nan.weighting.Weighting` for each group where it would merge.
Outside it, nothing changes. The adapter passes the value through, so a task
then yields a ``Weighting`` (NAN weighed the tensor), a tensor (mergekit
copied or passed it through without NAN) or None (mergekit skips it). In this
mode the norm pass also sums each x_i (``moments``), for the zero-mean premise.

Inside :func:`recording`, a real merge keeps the weighting of every tensor it
merged (what ``mergekit-nan merge`` puts on the model card), at no extra cost:
the norms are those the merge computed anyway.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import GroupMergeMethod, TensorGroup
from mergekit.merge_methods.dtype import align_dtype, promoted_dtype

from mergekit_nan.mergekit_compat import ResolvedGroups
from mergekit_nan.weighting import Weighting

__all__ = ["MeasurableMethod", "measuring", "record", "recording"]

_MEASURING: ContextVar[bool] = ContextVar("mergekit_nan_measuring", default=False)
_RECORDS: List[List[Tuple[Optional[str], Weighting]]] = []
_RECORDS_LOCK = threading.Lock()


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Within this block, NAN methods called by mergekit's adapter return weightings."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[List[Tuple[Optional[str], Weighting]]]:
    """Collect ``(tensor name, weighting)`` of every tensor NAN weighs inside the block.

    Process-wide (mergekit's multi-GPU executor merges on threads of its own).
    """
    found: List[Tuple[Optional[str], Weighting]] = []
    with _RECORDS_LOCK:
        _RECORDS.append(found)
    try:
        yield found
    finally:
        with _RECORDS_LOCK:
            _RECORDS.remove(found)


def record(group: TensorGroup, weighting: Weighting) -> None:
    """Note one merged tensor's weighting for every :func:`recording` block."""
    if not _RECORDS:
        return
    with _RECORDS_LOCK:
        for found in _RECORDS:
            found.append((group.metadata.name, weighting))


class MeasurableMethod(ResolvedGroups, GroupMergeMethod):
    """A group method that can report its coefficients instead of merging."""

    def weighting(
        self, group: TensorGroup, parameters: Mapping[str, Any], moments: bool = False
    ) -> Optional[Weighting]:
        """The coefficients for ``group`` with bound ``parameters`` (None: nothing to weigh).

        With ``moments`` the weighting carries the sum of each x_i too.
        """
        raise NotImplementedError

    def measured(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        dtype: Optional[torch.dtype],
    ) -> Optional[Tuple[Any, ...]]:
        """Inside :func:`measuring`, each group's weighting instead of the merged tensor."""
        if not _MEASURING.get():
            return None
        # The dtype the merge would compute in, as GroupMergeMethod aligns it.
        return tuple(
            self.weighting(align_dtype(group, dtype or promoted_dtype(group)), bound, moments=True)
            for group, bound in zip(groups, parameters)
        )
