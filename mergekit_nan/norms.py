"""The norm pass: per-input Frobenius norms of task vectors, in one read of each input.

For inputs theta_1..theta_n and an optional base theta_b, :func:`frobenius_norms`
returns ||x_i||_F with x_i = theta_i - theta_b (or theta_i). It is plain torch
and imports nothing from mergekit.

Exactness. x_i is formed element-wise in the accumulation dtype (float32, or
float64 for float64 inputs), never through ||a||^2 - 2<a,b> + ||b||^2, which
cancels catastrophically for small updates. Each row of
:data:`NORM_ROW_ELEMENTS` consecutive elements is reduced on its own in that
dtype (a long float32 reduction drifts, about 1e-3 relative over 16M
elements; a 1024-element row stays exact to a few ulps), and the rows' squares
are added in float64. Rows are fixed by position, so the result does not
depend on how the pass is cut into chunks or spread over workers: it is the
same floats every time.

Speed. The x_i are formed chunk by chunk in windows of a working buffer:
:func:`plan_norm_pass`, a pure function of the device, the size and the
free memory, decides how large a window is and how many run at once.

* On the CPU a window is cache-sized (:data:`CPU_CHUNK_ELEMENTS`), so only
  the inputs are read from memory, once; each window is converted,
  subtracted and reduced by one worker thread running torch's kernels on a
  single thread. Above :data:`PARALLEL_MIN_ELEMENTS` several workers (as many
  as torch's CPU threads) take windows from a shared queue. No kernel waits
  at a thread barrier, so busy cores slow the pass down only by the CPU time
  they take away, and a quiet machine uses all its cores.
* On an accelerator the kernels are few and large: one window per tensor
  when the working buffer is the merge's own output buffer, else windows of
  tens of millions of elements, as free memory allows.

The working buffer is ``scratch`` when given (the merge's float32 output
buffer, which is about to be overwritten anyway: the pass allocates nothing
the merge would not), else allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_nan.worker_pool import run_windows

__all__ = [
    "ACCELERATOR_CHUNK_ELEMENTS",
    "CPU_CHUNK_ELEMENTS",
    "NORM_CHUNK_ELEMENTS",
    "NORM_ROW_ELEMENTS",
    "PARALLEL_MIN_ELEMENTS",
    "NonFiniteInputError",
    "NormPlan",
    "accumulation_dtype",
    "frobenius_norms",
    "norms_and_sums",
    "plan_norm_pass",
]

NORM_ROW_ELEMENTS = 1024
"""Length of the rows reduced on their own (in float32), whose squares add up in float64."""

CPU_CHUNK_ELEMENTS = 1 << 20
"""Elements per CPU window (4 MiB in float32): the window stays in the cache (L2/L3) while it
is converted, subtracted and reduced, so memory sees one read of each input; large enough that
the Python between kernels is a few per cent of the pass. In the merge the window lies in the
output buffer, so it allocates nothing (measured against 256K and 512K windows, RESULTS.md)."""

NORM_CHUNK_ELEMENTS = CPU_CHUNK_ELEMENTS
"""The default window of the CPU pass (kept under its earlier name)."""

ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
"""Smallest window on an accelerator without the merge's buffer (32M elements, 128 MiB)."""

PARALLEL_MIN_ELEMENTS = 2 * CPU_CHUNK_ELEMENTS
"""Tensors below this many elements (two windows) are reduced by one worker: on fewer
windows a second thread costs more in hand-overs of Python's lock than it saves."""


class NonFiniteInputError(ValueError):
    """Some inputs hold NaN or Inf values.

    ``indices`` are positions in the ``tensors`` argument; ``base`` tells
    whether the base tensor itself is non-finite.
    """

    def __init__(self, indices: Tuple[int, ...], base: bool):
        self.indices = indices
        self.base = base
        culprits = [f"input {i}" for i in indices] + (["base"] if base else [])
        super().__init__(f"non-finite values (NaN or Inf) in {', '.join(culprits)}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and coefficients are computed in: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class NormPlan:
    """How the pass cuts one tensor: ``chunk`` elements per window, ``workers`` at once."""

    chunk: int
    workers: int


def _whole_rows(elements: int) -> int:
    return max(NORM_ROW_ELEMENTS, elements // NORM_ROW_ELEMENTS * NORM_ROW_ELEMENTS)


def plan_norm_pass(
    device_type: str,
    numel: int,
    *,
    threads: int = 1,
    free_bytes: Optional[int] = None,
    in_scratch: bool = False,
    chunk: Optional[int] = None,
) -> NormPlan:
    """The windows for a tensor of ``numel`` elements on ``device_type``.

    ``threads`` is how many CPU threads torch may use, ``free_bytes`` the
    accelerator's free memory (None: unknown), ``in_scratch`` whether the
    windows live in the merge's output buffer, ``chunk`` an explicit window
    size. A window is a whole number of rows, or the whole tensor.
    """
    if device_type == "cpu":
        size = _whole_rows(chunk or CPU_CHUNK_ELEMENTS)
        workers = 1
        if numel >= PARALLEL_MIN_ELEMENTS:
            workers = max(1, min(threads, math.ceil(numel / size)))
        return NormPlan(min(size, numel), workers)
    if chunk is not None:
        return NormPlan(min(_whole_rows(chunk), numel), 1)
    if in_scratch or free_bytes is None:
        return NormPlan(max(numel, 1), 1)
    # Two float32 windows (an input and the base), with half the free memory to spare.
    fits = _whole_rows(free_bytes // 4 // 4)
    return NormPlan(min(numel, max(ACCELERATOR_CHUNK_ELEMENTS, fits)), 1)


@dataclass
class _Pass:
    """One pass over one tensor's inputs: where the windows are and what they fill."""

    flats: List[torch.Tensor]
    base: Optional[torch.Tensor]
    dtype: torch.dtype
    chunk: int
    windows: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]
    rows: torch.Tensor  # [inputs, rows] row norms
    sums: Optional[torch.Tensor]  # [inputs, rows] row sums, when asked for

    def run_window(self, worker: int, start: int) -> None:
        """Form, reduce and record the x_i of one window."""
        numel = self.flats[0].numel()
        length = min(self.chunk, numel - start)
        window, base_window = self.windows[worker]
        part = window.narrow(0, 0, length)
        base_part = None
        if self.base is not None:
            base_part = self.base.narrow(0, start, length)
            if base_window is not None:
                base_part = base_window.narrow(0, 0, length).copy_(base_part)
        full = length // NORM_ROW_ELEMENTS
        first = start // NORM_ROW_ELEMENTS
        body = part.narrow(0, 0, full * NORM_ROW_ELEMENTS).view(full, NORM_ROW_ELEMENTS)
        tail = part.narrow(0, full * NORM_ROW_ELEMENTS, length - full * NORM_ROW_ELEMENTS)
        for index, flat in enumerate(self.flats):
            # x_i formed in the accumulation dtype inside the window: exact for close values.
            part.copy_(flat.narrow(0, start, length))
            if base_part is not None:
                part.sub_(base_part)
            if full:
                torch.linalg.vector_norm(body, dim=1, out=self.rows[index].narrow(0, first, full))
                if self.sums is not None:
                    torch.sum(body, dim=1, out=self.sums[index].narrow(0, first, full))
            if tail.numel():
                self.rows[index, first + full] = torch.linalg.vector_norm(tail)
                if self.sums is not None:
                    self.sums[index, first + full] = tail.sum()

    def run(self, workers: int) -> None:
        starts = range(0, self.flats[0].numel(), self.chunk)
        run_windows(starts, self.run_window, workers, self.flats[0].device)


def _layout(
    numel: int,
    inputs: int,
    plan: NormPlan,
    windows_per_worker: int,
    with_sums: bool,
    dtype: torch.dtype,
    device: torch.device,
    scratch: Optional[torch.Tensor],
) -> Tuple[NormPlan, List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Carve the windows and the row areas out of ``scratch`` (else allocate them)."""
    row_count = max(1, math.ceil(numel / NORM_ROW_ELEMENTS))
    areas = (2 if with_sums else 1) * inputs * row_count
    chunk, workers = plan.chunk, plan.workers
    if scratch is not None:
        room = numel - areas
        while workers > 1 and workers * windows_per_worker * chunk > room:
            workers -= 1
        if windows_per_worker * chunk > room:
            chunk = room // windows_per_worker // NORM_ROW_ELEMENTS * NORM_ROW_ELEMENTS
            chunk = chunk if chunk > 0 else 0
    if scratch is None or chunk <= 0:
        chunk, workers = plan.chunk, 1 if chunk <= 0 else workers
        buffer = torch.empty(
            workers * windows_per_worker * chunk + areas, dtype=dtype, device=device
        )
    else:
        buffer = scratch.view(-1)
    length = workers * windows_per_worker * chunk
    windows = list(buffer.narrow(0, 0, length).split(chunk)) if length else []
    area = buffer.narrow(0, buffer.numel() - areas, areas).view(-1, inputs, row_count)
    return NormPlan(chunk, workers), windows, area[0], area[1] if with_sums else None


def _reduce(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor],
    dtype: torch.dtype,
    plan: NormPlan,
    scratch: Optional[torch.Tensor],
    with_sums: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Squared norms (and sums) of the x_i in float64 (float32 on MPS)."""
    flats = [tensor.reshape(-1) for tensor in tensors]
    flat_base = None if base is None else base.reshape(-1)
    device, numel = flats[0].device, flats[0].numel()
    # On the CPU a kernel mixing dtypes first copies the odd operand to a temporary:
    # the base is converted once per window, into a window of its own. Accelerator
    # kernels convert as they read.
    converted_base = base is not None and base.dtype != dtype and device.type == "cpu"
    per_worker = 2 if converted_base else 1
    plan, buffers, rows, sums = _layout(
        numel, len(flats), plan, per_worker, with_sums, dtype, device, scratch
    )
    windows = [
        (buffers[i * per_worker], buffers[i * per_worker + 1] if per_worker == 2 else None)
        for i in range(plan.workers)
    ]
    step = _Pass(flats, flat_base, dtype, plan.chunk, windows, rows, sums)
    step.run(plan.workers)
    wide = torch.float32 if device.type == "mps" else torch.float64
    squares = rows.to(wide).square().sum(dim=1)
    return squares, None if sums is None else sums.to(wide).sum(dim=1)


def _plan(tensors: Sequence[torch.Tensor], scratch, chunk: Optional[int]) -> NormPlan:
    device = tensors[0].device
    free = None
    if device.type == "cuda" and scratch is None:
        free = torch.cuda.mem_get_info(device)[0]
    return plan_norm_pass(
        device.type,
        tensors[0].numel(),
        threads=torch.get_num_threads(),
        free_bytes=free,
        in_scratch=scratch is not None,
        chunk=chunk,
    )


def norms_and_sums(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    chunk: Optional[int] = None,
    scratch: Optional[torch.Tensor] = None,
    with_sums: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """||x_i||_F and, with ``with_sums``, sum(x_i), in one read of each input.

    See :func:`frobenius_norms`; the sums (float64, float32 on MPS) give the
    mean of each x_i, e.g. for NAN's zero-mean premise.
    """
    if not tensors:
        raise ValueError("at least one input tensor is required")
    if chunk is not None and chunk <= 0:
        raise ValueError("chunk must be positive")
    for tensor in (*tensors, *(() if base is None else (base,))):
        if not tensor.is_floating_point():
            raise TypeError(f"NAN needs floating-point tensors, got {tensor.dtype}")
    dtype = accumulation_dtype(tensors[0].dtype)
    numel = tensors[0].numel()
    if scratch is not None and (
        scratch.dtype != dtype or scratch.numel() != numel or not scratch.is_contiguous()
    ):
        raise ValueError(f"scratch must be a contiguous {dtype} tensor of {numel} elements")
    plan = _plan(tensors, scratch, chunk)
    squares, sums = _reduce(tensors, base, dtype, plan, scratch, with_sums)
    norms = squares.sqrt().to(dtype)
    if bool(torch.isfinite(norms).all()):
        return norms, sums
    # Rare path: overflow of the float32 accumulation, or non-finite inputs.
    squares, sums = _reduce(tensors, base, torch.float64, NormPlan(plan.chunk, 1), None, with_sums)
    if bool(torch.isfinite(squares).all()):
        return squares.sqrt(), sums
    bad = tuple(
        index for index, tensor in enumerate(tensors) if not bool(torch.isfinite(tensor).all())
    )
    bad_base = base is not None and not bool(torch.isfinite(base).all())
    if not bad and not bad_base:
        # Finite inputs whose differences exceed float64: impossible for
        # IEEE formats up to float64 itself, reported rather than hidden.
        raise OverflowError("task-vector norms overflow float64")
    raise NonFiniteInputError(bad, bad_base)


def frobenius_norms(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    chunk: Optional[int] = None,
    scratch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return ||x_i||_F for each input, x_i = tensors[i] - base (or tensors[i]).

    The result is a 1-D tensor on the inputs' device, in
    ``accumulation_dtype`` of the inputs; it does not depend on ``chunk`` (an
    explicit window size, rounded to whole rows) or on the number of workers.
    ``scratch`` is working memory: a contiguous tensor of the inputs' number of
    elements and accumulation dtype (such as the merge's output buffer), whose
    contents are overwritten. A float32 sum that overflows (inputs near the top
    of the half-precision ranges) is redone, and returned, in float64. One host
    sync checks finiteness; non-finite inputs raise :class:`NonFiniteInputError`.
    """
    norms, _ = norms_and_sums(tensors, base, chunk=chunk, scratch=scratch, with_sums=False)
    return norms
