"""Norms shared between merges of the same inputs: one norm pass for many recipes.

Recipes that differ only in what NAN does with the norms (``nan_exponent``,
``lambda``, ``nan_granularity``) need the same norms ||x_i|| for every tensor;
``mergekit-nan compare`` merges several such candidates. Inside
:func:`sharing`, :func:`~mergekit_nan.weighting.group_weighting` looks each
tensor group's norms up in the :class:`NormTable` before it computes them,
and adds the ones it computes: the first merge runs the norm pass, the others
read its numbers. A table hands back the floats the pass computed, in the
dtype it computed them in, so a merge that reads them derives exactly the
coefficients, and writes exactly the tensors, of one that computes them.

A norm is filed under the output tensor's name, the models NAN weighs, the
base its x_i are taken against (None: the tensors themselves), and the
inputs' dtype and size. That key cannot tell two different recipes' tensors
apart when their names agree, so a table is for merges of one set of inputs
through one plan; the caller keeps one table per such set. The sums of the
x_i (``moments``, for the zero-mean premise) are not shared: a weighting
whose norms come from the table carries none.

Plain torch and Python; no mergekit import.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["NormKey", "NormTable", "active_table", "sharing"]

NormKey = Tuple[Optional[str], Tuple[Hashable, ...], Optional[Hashable], str, int]
"""(output tensor, models weighed, base of the x_i or None, input dtype, elements)."""


class NormTable:
    """Each tensor group's norms, filed by :data:`NormKey`; safe to share between threads.

    ``computed`` counts the groups whose norms were added, ``reused`` the
    look-ups that found them.
    """

    def __init__(self) -> None:
        self._norms: Dict[NormKey, Tuple[Tuple[float, ...], torch.dtype]] = {}
        self._lock = threading.Lock()
        self.computed = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._norms)

    @staticmethod
    def key(
        name: Optional[str],
        models: Sequence[Hashable],
        base: Optional[Hashable],
        tensor: torch.Tensor,
    ) -> NormKey:
        """The key of a group whose first weighed input is ``tensor``."""
        return (name, tuple(models), base, str(tensor.dtype), tensor.numel())

    def find(self, key: NormKey, device: torch.device) -> Optional[torch.Tensor]:
        """The norms filed under ``key`` as a tensor on ``device`` (None: not filed)."""
        with self._lock:
            found = self._norms.get(key)
            if found is None:
                return None
            self.reused += 1
        values, dtype = found
        return torch.tensor(values, dtype=dtype, device=device)

    def add(self, key: NormKey, norms: Sequence[float], dtype: torch.dtype) -> None:
        """File ``norms`` (one per model of ``key``), computed in ``dtype``."""
        with self._lock:
            if key not in self._norms:
                self.computed += 1
            self._norms[key] = (tuple(norms), dtype)


_ACTIVE: Optional[NormTable] = None
_ACTIVE_LOCK = threading.Lock()


def active_table() -> Optional[NormTable]:
    """The table of the enclosing :func:`sharing` block, if any (process-wide)."""
    return _ACTIVE


@contextlib.contextmanager
def sharing(table: NormTable) -> Iterator[NormTable]:
    """Within this block, NAN weightings read their norms from ``table`` and add new ones.

    Process-wide, as mergekit's multi-GPU executor weighs tensors on threads
    of its own; blocks do not nest.
    """
    global _ACTIVE
    with _ACTIVE_LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("a norm table is already being shared")
        _ACTIVE = table
    try:
        yield table
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE = None
