"""Every shell and Python block of the README and of ``docs/`` runs, so none of them rots.

Each page runs in a directory of its own, top to bottom: a YAML block whose first
line is ``# NAME.yml`` is written to that file, a shell block runs line by line
(the installed console scripts in this process, through ``support.run_command``;
``python -m pytest`` in the repository, anything else in ``bash``), a Python block
is executed. Every command must exit 0.
Two kinds of line run elsewhere, on purpose: the README's setup commands (a fresh
virtual environment, ``tests/test_packaging.py``, and CI's ``.ci/run``) and the
benchmark scripts (``tests/test_benchmarks.py`` runs the lines of
``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterator

import pytest
from support import DOCUMENTED, REPO, blocks, commands, run_command

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = {entry.name for entry in entry_points(group="console_scripts")}
SETUP = "python3 -m venv .venv"
BENCHMARK = "python benchmarks/"


def elsewhere(command: str) -> bool:
    return command.startswith(SETUP) or command.startswith(BENCHMARK)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run(command: str, where: Path, label: str) -> None:
    words = shlex.split(command)
    if words[0] in SCRIPTS:
        result = run_command(*words, cwd=where)
    elif command.startswith("python -m pytest"):  # a part of this suite, from the repository
        result = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=300)
    else:
        result = subprocess.run(
            ["bash", "-c", command], cwd=where, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 0, f"{label}: {command}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_block_of_the_page_runs(page, tmp_path):
    ran = 0
    for block in blocks(page):
        label = f"{page.relative_to(REPO)}:{block.line}"
        first = block.text.splitlines()[0] if block.text else ""
        if block.language == "yaml" and re.fullmatch(r"# [\w.+-]+\.ya?ml", first):
            (tmp_path / first[2:]).write_text(block.text)
        elif block.language in ("bash", "sh"):
            for command in commands(block):
                if not elsewhere(command):
                    run(command, tmp_path, label)
                    ran += 1
        elif block.language == "python":
            with working_directory(tmp_path):
                exec(compile(block.text, label, "exec"), {"__name__": "__docs__"})
            ran += 1
    assert ran, f"{page.name} has no block to run"


def test_the_setup_commands_are_ci_and_the_packaging_test():
    (setup,) = [b for b in blocks(REPO / "README.md") if SETUP in b.text]
    assert setup.line < 5, "the two commands open the README"
    first, second = [c for c in commands(setup)]
    ci = (REPO / ".ci" / "run").read_text()
    test_command = second.rsplit(" && ", 1)[1]
    assert test_command == "python -m pytest -q" and test_command in ci.splitlines()
    assert 'pip install -q ".[test]"' in ci and "torch==2.13.0" in ci
    packaging = (REPO / "tests" / "test_packaging.py").read_text()
    assert "README_SETUP" in packaging and first.endswith("mergekit-nan demo")


def test_every_benchmark_line_is_run_by_the_benchmark_tests():
    documented = [
        command
        for page in PAGES
        for block in blocks(page)
        if block.language in ("bash", "sh")
        for command in commands(block)
        if command.startswith(BENCHMARK)
    ]
    assert documented and sorted(documented) == sorted(DOCUMENTED)
