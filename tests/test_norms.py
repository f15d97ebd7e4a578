"""The norm pass: how it cuts a tensor, and that the cut never changes a float."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import types

import pytest
import torch

from mergekit_nan import worker_pool
from mergekit_nan.norms import (
    ACCELERATOR_CHUNK_ELEMENTS,
    CPU_CHUNK_ELEMENTS,
    NORM_ROW_ELEMENTS,
    PARALLEL_MIN_ELEMENTS,
    frobenius_norms,
    norms_and_sums,
    plan_norm_pass,
)
from mergekit_nan.worker_pool import run_windows

CPU = torch.device("cpu")
LARGEST = 400_000_000
"""Elements of a large model's largest tensor (a 3B model's embedding: 394M)."""


def chunks(plan, numel: int) -> int:
    return math.ceil(numel / plan.chunk)


def test_a_large_tensor_is_a_handful_of_kernels_on_cuda():
    in_output_buffer = plan_norm_pass("cuda", LARGEST, in_scratch=True)
    assert chunks(in_output_buffer, LARGEST) == 1
    roomy = plan_norm_pass("cuda", LARGEST, free_bytes=80 * 2**30)
    assert chunks(roomy, LARGEST) == 1
    tight = plan_norm_pass("cuda", LARGEST, free_bytes=2 * 2**30)
    assert 1 < chunks(tight, LARGEST) <= 4 and tight.chunk * 4 * 2 <= 2 * 2**30
    crowded = plan_norm_pass("cuda", LARGEST, free_bytes=2**20)
    assert crowded.chunk == ACCELERATOR_CHUNK_ELEMENTS and chunks(crowded, LARGEST) <= 12
    assert {p.workers for p in (in_output_buffer, roomy, tight, crowded)} == {1}


def test_on_the_cpu_windows_are_cache_sized_and_threads_pay_only_for_large_tensors():
    large = plan_norm_pass("cpu", LARGEST, threads=8)
    assert large.chunk == CPU_CHUNK_ELEMENTS and large.workers == 8
    assert CPU_CHUNK_ELEMENTS * 4 <= 4 * 2**20  # one float32 window fits in the cache
    small = plan_norm_pass("cpu", PARALLEL_MIN_ELEMENTS - 1, threads=8)
    assert small.workers == 1
    assert plan_norm_pass("cpu", 5 * CPU_CHUNK_ELEMENTS, threads=8).workers == 5
    assert plan_norm_pass("cpu", 10, threads=8) == plan_norm_pass("cpu", 10, threads=1)
    assert plan_norm_pass("cpu", 10).chunk == 10  # a small tensor is one window
    assert plan_norm_pass("cpu", LARGEST, chunk=1000).chunk == NORM_ROW_ELEMENTS


def family(numel: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator)
    tuned = [base + s * torch.randn(numel, generator=generator) for s in (0.01, 0.03, 0.1)]
    return base.to(dtype), [t.to(dtype) for t in tuned]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_workers_chunks_and_scratch_give_the_same_floats(dtype, monkeypatch):
    numel = PARALLEL_MIN_ELEMENTS + 3 * CPU_CHUNK_ELEMENTS + 517  # a partial window and row
    base, tuned = family(numel, dtype)
    expected = torch.tensor(
        [math.sqrt(math.fsum((t.double() - base.double()).square().tolist())) for t in tuned]
    )
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(frobenius_norms(tuned, base))
            scratch = torch.empty(numel, dtype=torch.float32)
            results.append(frobenius_norms(tuned, base, scratch=scratch))
            results.append(frobenius_norms(tuned, base, chunk=5 * NORM_ROW_ELEMENTS))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for result in results:
        assert torch.equal(result, results[0])
    assert float(((results[0].double() - expected).abs() / expected).max()) < 1e-7


def test_a_scratch_too_small_for_every_window_still_works():
    base, tuned = family(3000, torch.bfloat16, seed=1)
    scratch = torch.empty(3000, dtype=torch.float32)
    assert torch.equal(frobenius_norms(tuned, base, scratch=scratch), frobenius_norms(tuned, base))


@pytest.mark.parametrize("with_base", [True, False])
def test_sums_come_from_the_same_pass(with_base):
    base, tuned = family(70_000, torch.bfloat16, seed=2)
    origin = base.double() if with_base else 0.0
    norms, sums = norms_and_sums(tuned, base if with_base else None)
    for norm, total, tensor in zip(norms.tolist(), sums.tolist(), tuned):
        x = tensor.double() - origin
        assert math.isclose(norm, float(x.norm()), rel_tol=1e-6)
        assert math.isclose(total, float(x.sum()), rel_tol=1e-5, abs_tol=1e-3)


def _windows_in_a_child() -> None:
    done = []
    run_windows(range(8), lambda worker, start: done.append((worker, start)), 2, CPU)
    os._exit(0 if sorted(start for _, start in done) == list(range(8)) else 1)


def test_a_forked_child_gets_worker_threads_of_its_own():
    """A child forked after the worker pool was made runs windows on threads of its own.

    (The child runs no torch kernel: torch's OpenMP threads are not fork-safe either.)
    """
    seen = []
    run_windows(range(8), lambda worker, start: seen.append(worker), 2, CPU)  # the parent's pool
    assert len(seen) == 8 and set(seen) <= {0, 1}
    child = multiprocessing.get_context("fork").Process(target=_windows_in_a_child)
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the child's windows waited on threads it does not have"


def test_an_interrupt_stops_the_other_workers_taking_windows(monkeypatch):
    """Ctrl-C on the calling thread ends the pass after the windows already in hand."""
    stop_seen = threading.Event()

    class Stop(threading.Event):
        def set(self) -> None:
            super().set()
            stop_seen.set()

    proxy = types.SimpleNamespace(Lock=threading.Lock, Event=Stop, local=threading.local)
    monkeypatch.setattr(worker_pool, "threading", proxy)
    done = []
    in_hand = threading.Event()

    def job(worker: int, start: int) -> None:
        if worker == 0:
            assert in_hand.wait(30)
            raise KeyboardInterrupt
        in_hand.set()
        assert stop_seen.wait(30)  # the pass is stopped while this window is in hand
        done.append(start)

    with pytest.raises(KeyboardInterrupt):
        run_windows(range(1000), job, 2, CPU)
    assert len(done) == 1  # the window in hand, and no other
