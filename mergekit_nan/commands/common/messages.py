"""How a ``mergekit-nan`` command ends on an error: one line on stderr, exit status 1.

:func:`reported` turns any exception of a command into ``Error: <one line>``
(``-v``/``--verbose`` shows the traceback instead); Ctrl-C, click's own exits
and messages pass through.
"""

from __future__ import annotations

import functools
from typing import Callable

import click

__all__ = ["one_line", "reported"]


def one_line(error: BaseException) -> str:
    """The error's message on one line (a missing file: what and which)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, IsADirectoryError)) and error.filename:
        text = f"{error.strerror or 'not found'}: {error.filename}"
    return text


def reported(command: Callable) -> Callable:
    """Turn exceptions into ``Error: <one line>`` (tracebacks with ``-v``)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.Abort, click.exceptions.Exit, KeyboardInterrupt):
            raise
        except Exception as error:
            if kwargs.get("verbose"):
                raise
            raise click.ClickException(one_line(error)) from None

    return run
