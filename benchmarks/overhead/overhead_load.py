"""Busy cores on demand: the overhead benchmark's second regime.

:func:`busy_processes` starts ``count`` background processes that each run a
deterministic integer loop (a linear congruential generator, no I/O, no
memory traffic beyond the cache) until the block ends, so every merge of the
block competes for the cores with them, as on a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator, List

__all__ = ["BUSY_LOOP", "busy_processes", "load_average"]

BUSY_LOOP = "x = 1\nwhile True:\n    x = (x * 1103515245 + 12345) % 2147483648\n"
"""What each busy process runs: pure CPU, the same instructions every time."""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[List[subprocess.Popen]]:
    """``count`` busy processes running for the duration of the block (none for 0)."""
    processes = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
