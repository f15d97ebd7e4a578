"""NAN coefficients: per-input Frobenius norms to normalised merge weights.

This module is the single source of the NAN arithmetic (Si et al., 2025,
arXiv 2505.16148). It is plain torch and imports nothing from mergekit, so the
merge method, the modifier, the CLI and the tests all call the same code.

For inputs x_1..x_n (task vectors or full tensors), exponent p and priors w::

    alpha_i = w_i * ||x_i||_F^(-p) / sum_j w_j * ||x_j||_F^(-p)

Zero-norm rule: an input whose x_i is exactly zero carries no information; its
coefficient is 0 and the others are renormalised. If every x_i is zero the
coefficients fall back to the normalised priors w_i / sum_j w_j (the merge then
returns the base, or the plain average when there is no base).

Norms are accumulated in float32 (float64 for float64 inputs) chunk by chunk,
with differences to the base formed element-wise in that precision, so no
full-size temporary is allocated and small task vectors do not cancel.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import torch

__all__ = [
    "NORM_CHUNK_ELEMENTS",
    "NonFiniteInputError",
    "accumulation_dtype",
    "coefficients_from_norms",
    "frobenius_norms",
    "tensor_coefficients",
]

NORM_CHUNK_ELEMENTS = 1 << 18
"""Elements per input converted at once when no scratch buffer is given (1 MiB in float32).

Small on purpose: glibc raises its dynamic mmap threshold to the size of the
largest block freed, and a merge's later allocations below that threshold stay
on the heap, raising the process's peak memory. 1 MiB keeps that effect
negligible while each chunk is still large enough to run at memory speed."""

NORM_ROW_ELEMENTS = 1024
"""Length of the rows whose float32 sums of squares are added up in float64."""


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


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    # A view for contiguous inputs; only exotic strides pay for a copy.
    return tensor.reshape(-1)


def _squares(part: torch.Tensor, dtype: torch.dtype, wide: torch.dtype) -> torch.Tensor:
    """Sum of squares of a 1-D ``part``: short rows reduced in ``dtype``, rows summed in ``wide``.

    One long float32 reduction drifts (about 1e-3 relative over 16M elements on
    CPU); rows of ``NORM_ROW_ELEMENTS`` keep each float32 sum short and exact
    to a few ulps, and their squares add up in float64.
    """
    rows = part.numel() // NORM_ROW_ELEMENTS
    body = part.narrow(0, 0, rows * NORM_ROW_ELEMENTS).view(rows, NORM_ROW_ELEMENTS)
    total = torch.linalg.vector_norm(body, dim=1, dtype=dtype).to(wide).square().sum()
    if part.numel() == rows * NORM_ROW_ELEMENTS:
        return total
    tail = part.narrow(0, rows * NORM_ROW_ELEMENTS, part.numel() - rows * NORM_ROW_ELEMENTS)
    return total + torch.linalg.vector_norm(tail, dtype=dtype).to(wide).square()


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU kernels on one thread inside the block (other devices: unchanged).

    The norm pass is thousands of small, cache-sized operations; splitting each
    across threads gains little and makes every one wait at a barrier for all
    threads. When other processes share the cores, that wait is a scheduler
    time slice: on two busy cores the pass took 10 to 30 times longer
    multi-threaded than on one thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _norms_in(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor],
    dtype: torch.dtype,
    buffer: torch.Tensor,
    base_buffer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Norms of the x_i, one ``buffer``-sized chunk at a time.

    With ``base_buffer`` (as long as ``buffer``), each chunk of the base is
    converted to ``dtype`` once instead of once per input; the differences are
    the same floats either way.
    """
    flats = [_flat(t) for t in tensors]
    flat_base = _flat(base) if base is not None else None
    numel = flats[0].numel()
    wide = torch.float32 if buffer.device.type == "mps" else torch.float64
    squares = [torch.zeros((), dtype=wide, device=buffer.device) for _ in flats]
    chunk = max(buffer.numel(), 1)
    for start in range(0, numel, chunk):
        length = min(chunk, numel - start)
        part = buffer.narrow(0, 0, length)
        base_part = None
        if flat_base is not None:
            base_part = flat_base.narrow(0, start, length)
            if base_buffer is not None:
                base_part = base_buffer.narrow(0, 0, length).copy_(base_part)
        for index, flat in enumerate(flats):
            # x_i formed in ``dtype`` inside the buffer: exact for close values.
            part.copy_(flat.narrow(0, start, length))
            if base_part is not None:
                part.sub_(base_part)
            squares[index] = squares[index] + _squares(part, dtype, wide)
    return torch.stack(squares).sqrt().to(dtype)


def frobenius_norms(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    chunk: int = NORM_CHUNK_ELEMENTS,
    scratch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return ||x_i||_F for each input, x_i = tensors[i] - base (or tensors[i]).

    The result is a 1-D tensor on the inputs' device, in
    ``accumulation_dtype`` of the inputs. Each x_i is formed in that dtype in a
    working buffer of at most ``chunk`` elements, taken from ``scratch`` when
    given (a contiguous tensor of the inputs' shape and accumulation dtype, such
    as the merge's output buffer, whose contents are overwritten; a second
    window of it, when there is room, holds the base's chunk), else
    allocated. A float32 sum that overflows (inputs near the top of the
    half-precision ranges) is redone, and returned, in float64. One host sync
    checks finiteness; non-finite inputs raise :class:`NonFiniteInputError`.
    """
    if not tensors:
        raise ValueError("at least one input tensor is required")
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    for tensor in (*tensors, *(() if base is None else (base,))):
        if not tensor.is_floating_point():
            raise TypeError(f"NAN needs floating-point tensors, got {tensor.dtype}")
    dtype = accumulation_dtype(tensors[0].dtype)
    numel, device = tensors[0].numel(), tensors[0].device
    if scratch is None:
        buffer = torch.empty(min(chunk, numel), dtype=dtype, device=device)
    elif scratch.dtype != dtype or scratch.numel() != numel or not scratch.is_contiguous():
        raise ValueError(f"scratch must be a contiguous {dtype} tensor of {numel} elements")
    else:
        buffer = scratch.view(-1).narrow(0, 0, min(chunk, numel))
    base_buffer = None
    if scratch is not None and base is not None and base.dtype != dtype:
        # Room for a second window: the base is converted once per chunk.
        window = buffer.numel()
        if numel >= 2 * window:
            base_buffer = scratch.view(-1).narrow(0, window, window)
    with _one_cpu_thread(device):
        norms = _norms_in(tensors, base, dtype, buffer, base_buffer)
    if bool(torch.isfinite(norms).all()):
        return norms
    # Rare path: overflow of the float32 accumulation, or non-finite inputs.
    wide_buffer = torch.empty(min(chunk, numel), dtype=torch.float64, device=device)
    with _one_cpu_thread(device):
        wide = _norms_in(tensors, base, torch.float64, wide_buffer)
    if bool(torch.isfinite(wide).all()):
        return wide
    bad = tuple(
        index for index, tensor in enumerate(tensors) if not bool(torch.isfinite(tensor).all())
    )
    bad_base = base is not None and not bool(torch.isfinite(base).all())
    if not bad and not bad_base:
        # Finite inputs whose differences exceed float64: impossible for
        # IEEE formats up to float64 itself, reported rather than hidden.
        raise OverflowError("task-vector norms overflow float64")
    raise NonFiniteInputError(bad, bad_base)


def coefficients_from_norms(
    norms: torch.Tensor,
    *,
    exponent: float = 1.0,
    prior: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Turn norms into NAN coefficients that sum to one.

    ``norms`` has shape ``[..., n]`` (non-negative); ``prior`` broadcasts to
    it (default all ones, non-negative). Computed in log space so extreme norms
    or exponents neither overflow nor underflow; the result has the norms'
    accumulation dtype. Zero norms get coefficient 0;
    rows whose norms are all zero get the normalised prior. A row whose
    weighted sum is zero (all priors zero) raises ``ValueError``.
    """
    if not math.isfinite(exponent):
        raise ValueError(f"nan_exponent must be finite, got {exponent}")
    result_dtype = accumulation_dtype(norms.dtype)
    # A handful of numbers: float64 keeps the log-space round trip exact to
    # float32 output precision (except on backends without float64).
    dtype = torch.float32 if norms.device.type == "mps" else torch.float64
    norms = norms.to(dtype)
    if prior is None:
        prior = torch.ones_like(norms)
    else:
        prior = torch.broadcast_to(prior.to(dtype=dtype, device=norms.device), norms.shape)
    informative = norms > 0
    logits = torch.where(
        informative, -exponent * torch.log(torch.where(informative, norms, 1.0)), -math.inf
    )
    logits = torch.where(prior > 0, logits, -math.inf)
    any_informative = (logits > -math.inf).any(dim=-1, keepdim=True)
    shift = torch.where(any_informative, logits.amax(dim=-1, keepdim=True), 0.0)
    scores = torch.where(
        any_informative,
        prior * torch.exp(logits - shift),
        prior,
    )
    total = scores.sum(dim=-1, keepdim=True)
    if not bool((total > 0).all() & (prior >= 0).all()):
        raise ValueError("NAN priors (weight) must be non-negative and not all zero")
    return (scores / total).to(result_dtype)


def tensor_coefficients(
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    exponent: float = 1.0,
    prior: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Norms of ``tensors`` (minus ``base`` when given) to NAN coefficients.

    Returns a 1-D tensor of ``len(tensors)`` coefficients on the inputs' device.
    """
    norms = frobenius_norms(tensors, base)
    weights = (
        None if prior is None else torch.tensor(list(prior), dtype=norms.dtype, device=norms.device)
    )
    if weights is not None and weights.shape != norms.shape:
        raise ValueError(f"expected {norms.numel()} prior weights, got {weights.numel()}")
    return coefficients_from_norms(norms, exponent=exponent, prior=weights)
