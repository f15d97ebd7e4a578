"""Run installed console commands (stock mergekit's and ``mergekit-nan``) as a user would.

The suite's one command runner: every test that runs ``mergekit-nan`` or a stock
command gets a :class:`subprocess.CompletedProcess` (``returncode``, ``stdout``,
``stderr``), whichever way it ran. Two ways, both through the command's installed
console-script entry point:

* :func:`run_command` runs it in this interpreter, with stdout, stderr, the
  log records a fresh process would print (``logging.basicConfig``'s format)
  and Python's default warnings captured, and the exit status a shell would
  see: click's own for usage errors and ``Error: ...`` messages, 1 with the
  traceback for an uncaught exception. It costs a fraction of a second
  instead of the 5-7 s of imports of a new interpreter. mergekit's loader
  cache, which lives as long as the process, is emptied before and after,
  as in a new process.
* :func:`start_child` runs it in a child forked from a server process that
  has imported mergekit, torch and the plugin once (``multiprocessing``'s
  ``forkserver``): a real process that can be killed, interrupted or given
  resource limits, without paying for the imports again. The server is
  started by a new interpreter, so the plugin reaches mergekit through the
  installed start-up hook, exactly as in a shell.

Tests that need an interpreter of their own (the start-up hook, mergekit
without the plugin, a fresh environment) use ``subprocess`` directly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

from .recipes import write_recipe

PRELOAD = ["mergekit.scripts.run_yaml", "mergekit.scripts.multimerge", "mergekit_nan.commands.cli"]
"""What the fork server imports once; every child starts with it."""


def command(name: str):
    """The click command behind the installed console script ``name``."""
    (found,) = entry_points(group="console_scripts", name=name)
    return found.load()


def _forget_loaders() -> None:
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()
    LoaderCache().loaders.clear()


@contextlib.contextmanager
def _as_a_process(stdout: io.StringIO, stderr: io.StringIO) -> Iterator[None]:
    """Output, log records and warnings go where a fresh process would print them."""
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        # Python's default filters, as a new interpreter has them.
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=ResourceWarning)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                yield
        finally:
            root.removeHandler(handler)
            for warning in caught:
                stderr.write(
                    warnings.formatwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
                )


def run_command(
    name: str, *args: object, cwd: Optional[Path] = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Run the installed command ``name`` in this process; returns what a shell would get.

    ``args`` are passed as strings (paths may be given as they are).
    """
    main = command(name)
    args = tuple(str(arg) for arg in args)
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    code = 0
    _forget_loaders()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with _as_a_process(stdout, stderr):
            try:
                main.main(args=list(args), prog_name=name, standalone_mode=True)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
                if exit.code is not None and not isinstance(exit.code, int):
                    print(exit.code, file=sys.stderr)
            except Exception:  # as the interpreter would: the traceback, status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
        _forget_loaders()
    result = subprocess.CompletedProcess([name, *args], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{name} exited with {code}:\n{result.stderr[-4000:]}")
    return result


def run_mergekit_yaml(
    config: Dict, out: Path, *extra: str, check: bool = True, copy_tokenizer: bool = False
) -> subprocess.CompletedProcess:
    """Write ``config`` next to ``out`` and run the stock ``mergekit-yaml`` on it.

    The command runs in this process (:func:`run_command`). The tiny fixtures
    have no tokenizer, so ``--no-copy-tokenizer`` is passed unless ``copy_tokenizer``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = write_recipe(out.parent / f"{out.name}.yml", config)
    copy = () if copy_tokenizer else ("--no-copy-tokenizer",)
    result = run_command("mergekit-yaml", str(config_path), str(out), *copy, *extra)
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{result.stderr[-4000:]}")
    return result


def run_merge(
    recipe: Path, out: Path, *extra: object, check: bool = True
) -> subprocess.CompletedProcess:
    """``mergekit-nan merge RECIPE OUT --no-copy-tokenizer EXTRA...`` in this process
    (:func:`run_command`); with ``check`` a non-zero exit fails the test with its stderr."""
    return run_command(
        "mergekit-nan", "merge", recipe, out, "--no-copy-tokenizer", *extra, check=check
    )


def assert_clean_failure(result: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    """A command's clean failure: exit 1, one ``Error: ...`` line naming ``words``, and
    nothing written at ``out`` (no partial output beside it either)."""
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


# -- real processes, forked from a server that has imported everything once ---------------

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)

STALL_MARKER = "first-shard-written"
"""File a stalled child creates in its ``stall_dir`` once its first output shard is on disk."""


def _stall_after_first_shard(marker: Path) -> None:
    """Make the child stop for a minute right after writing its first output shard."""
    from mergekit.io.tensor_writer import TensorWriter

    original = TensorWriter._flush_current_shard

    def flush(self):
        result = original(self)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(60)
        return result

    TensorWriter._flush_current_shard = flush


def _child(
    name: str,
    args: Sequence[str],
    cwd: str,
    log: str,
    file_size_limit: Optional[int],
    stall_dir: Optional[str],
) -> None:
    with open(log, "wb", buffering=0) as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    os.chdir(cwd)
    # A command the user started in the foreground of a terminal, where Ctrl-C reaches it
    # with Python's default handler. The fork server hands its children the SIGINT
    # disposition that its own interpreter started with, which is SIG_IGN whenever the
    # test run was started with SIGINT ignored (a background job of a script or a CI
    # runner): Python then installs no handler, and an interrupt would be dropped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stall_dir is not None:
        _stall_after_first_shard(Path(stall_dir) / STALL_MARKER)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    sys.argv = [name, *args]
    command(name).main(args=list(args), prog_name=name, standalone_mode=True)


@dataclass
class Child:
    """A command running in a forked child; ``log`` holds its stdout and stderr together."""

    process: multiprocessing.process.BaseProcess
    log: Path

    def wait(self, timeout: float = 120) -> int:
        """The exit status: a shell's number, or minus the signal that ended it."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"the child did not finish in {timeout} s:\n{self.output}")
        return self.process.exitcode

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_child(
    name: str,
    *args: str,
    cwd: Path,
    file_size_limit: Optional[int] = None,
    stall_dir: Optional[Path] = None,
) -> Child:
    """Start the installed command ``name`` in a forked child (see the module docstring).

    ``file_size_limit`` sets ``RLIMIT_FSIZE`` (writes beyond it fail with
    ``EFBIG``); with ``stall_dir`` the child stops for a minute after its first
    output shard and says so by creating :data:`STALL_MARKER` there. The child
    takes SIGINT as a command in the foreground of a terminal does (Python's
    default handler), however the test run itself was started.
    """
    log = cwd / f".child-{name}-{time.monotonic_ns()}.log"
    process = _CONTEXT.Process(
        target=_child,
        args=(name, list(args), str(cwd), str(log), file_size_limit, stall_dir and str(stall_dir)),
    )
    process.start()
    return Child(process, log)


def wait_for(path: Path, child: Child, timeout: float = 120) -> None:
    """Wait until ``path`` exists and holds its text; fail if the child ends first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        if not child.process.is_alive():
            raise AssertionError(f"the child ended before {path.name} appeared:\n{child.output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear in {timeout} s:\n{child.output}")
        time.sleep(0.02)
