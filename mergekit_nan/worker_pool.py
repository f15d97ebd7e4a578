"""Windows of work on a kept pool of threads, each running torch's kernels on one thread.

The norm pass (:mod:`mergekit_nan.norms`) and ``nan``'s weighted sum
(:mod:`mergekit_nan.method`) cut a tensor into cache-sized windows and hand
them to :func:`run_windows`: the calling thread and the pool's workers take
windows from one shared queue, and on the CPU every worker runs torch's
kernels on a single thread, so no kernel waits at a thread barrier and a
worker slowed by a busy core takes fewer windows. :func:`one_thread` is the
same setting for one block of the calling thread (the LoRA factor products).
Plain torch, no mergekit.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import torch

__all__ = ["one_thread", "run_windows"]

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()
_CONFIGURED = threading.local()


def _forget_the_pool() -> None:
    """In a forked child: the parent's worker threads do not exist there, so start afresh."""
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_the_pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="mergekit-nan-norms")
        return _POOL


def _single_threaded_kernels() -> None:
    """torch's CPU kernels on this thread's own single thread (set once per worker thread)."""
    if not getattr(_CONFIGURED, "done", False):
        torch.set_num_threads(1)
        _CONFIGURED.done = True


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU kernels on one intra-op thread inside the block (restored after)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _cpu_kernels_on_one_thread(device: torch.device) -> Iterator[None]:
    """The calling thread's kernels run on one thread inside the block (CPU only)."""
    if device.type != "cpu":
        yield
        return
    with one_thread():
        yield


def run_windows(
    starts: Iterable[int],
    job: Callable[[int, int], None],
    workers: int,
    device: torch.device,
) -> None:
    """Call ``job(worker, start)`` once for every start, on ``workers`` threads.

    The calling thread is worker 0; the others come from a kept pool. On the
    CPU every worker, the caller included for the duration of the call, runs
    torch's kernels on one thread, so no kernel waits at a thread barrier.
    Windows are taken from a shared queue, so a worker slowed by a busy core
    takes fewer of them.
    """
    with _cpu_kernels_on_one_thread(device):
        _run_windows(starts, job, workers)


def _run_windows(starts: Iterable[int], job: Callable[[int, int], None], workers: int) -> None:
    if workers == 1:
        for start in starts:
            job(0, start)
        return
    queue = iter(starts)
    lock = threading.Lock()
    stopped = threading.Event()

    def work(worker: int) -> None:
        _single_threaded_kernels()
        try:
            while not stopped.is_set():
                with lock:
                    start = next(queue, None)
                if start is None:
                    return
                job(worker, start)
        except BaseException:
            # Ctrl-C (on the calling thread) or an error on any: the other workers finish
            # the window they hold and take no more, so nothing waits for the rest.
            stopped.set()
            raise

    futures = [_pool(workers - 1).submit(work, w) for w in range(1, workers)]
    try:
        work(0)
    finally:
        for future in futures:
            future.result()
