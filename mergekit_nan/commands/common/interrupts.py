"""Ctrl-C and ``kill`` end a merge the same clean way.

Python turns SIGINT into ``KeyboardInterrupt``, so the partial directory of
:mod:`mergekit_nan.commands.common.output` is removed on the way out. SIGTERM (what
``kill``, ``timeout`` and most job schedulers send) would end the process on
the spot and leave that directory behind; inside :func:`stopped_by_signals`
it raises :class:`Terminated` instead, which unwinds the same way. A signal
the process was started with ignored (``nohup``, a background job of a
script) stays ignored, as in any POSIX program.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["Terminated", "stopped_by_signals"]


class Terminated(BaseException):
    """SIGTERM arrived; like ``KeyboardInterrupt``, not an ``Exception``, so nothing swallows it."""

    exit_status = 128 + signal.SIGTERM


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block.

    Unless SIGTERM is ignored or handled already, or the caller is not the
    main thread (only it can set signal handlers): then nothing changes.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
