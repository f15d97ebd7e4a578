"""The documentation's code blocks and the benchmark scripts they run."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator, List

import torch

REPO = Path(__file__).resolve().parent.parent.parent
"""The repository root."""
BENCHMARKS = REPO / "benchmarks"
OPERATORS = {"&&", "||", "|", ";"}


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int


def blocks(page: Path) -> List[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found = []
    pattern = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.S | re.M)
    text = page.read_text()
    for match in pattern.finditer(text):
        found.append(Block(match.group(1), match.group(2), text[: match.start()].count("\n") + 1))
    return found


def commands(block: Block) -> Iterator[str]:
    """The command lines of a shell block (continuations joined, comments dropped)."""
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield " ".join(word if word in OPERATORS else shlex.quote(word) for word in words)


DOCUMENTED = [
    command
    for block in blocks(REPO / "docs" / "benchmarks.md")
    if block.language == "bash"
    for command in commands(block)
    if command.startswith("python benchmarks/")
]
"""The benchmark command lines of the docs; the benchmark tests run them as written."""


def documented_arguments(script: str) -> List[str]:
    """The arguments of the documented command line of ``script`` (``FOLDER/NAME.py`` or ``NAME.py``)."""
    (line,) = [c for c in DOCUMENTED if c.split()[1].endswith(f"/{script}")]
    return shlex.split(line)[2:]


def benchmark_folder(script: str) -> Path:
    """The folder of ``benchmarks/`` that holds ``script``: one folder per benchmark."""
    (path,) = BENCHMARKS.glob(f"*/{script}")
    return path.parent


def benchmark_script(script: str) -> ModuleType:
    """A benchmark script as a module (its own imports find its sibling modules)."""
    folder = str(benchmark_folder(script))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(Path(script).stem)


@contextlib.contextmanager
def imported_benchmark(monkeypatch, script: str) -> Iterator[ModuleType]:
    """A benchmark script imported offline for a test; the process-wide state it sets (torch
    threads, transformers' logging) is given back to the other tests afterwards."""
    monkeypatch.syspath_prepend(str(benchmark_folder(script)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    threads = torch.get_num_threads()
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    try:
        yield importlib.import_module(Path(script).stem)
    finally:
        torch.set_num_threads(threads)
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def run_benchmark(script: str, *args: str) -> str:
    """Run a benchmark script's ``main`` in this process; its stdout (it must exit 0)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = benchmark_script(script).main(list(args))
    finally:
        torch.set_num_threads(threads)  # the quality benchmark runs on one thread
    assert code == 0, stderr.getvalue()[-4000:]
    return stdout.getvalue()
