"""Nothing lost, nothing half-written: ``mergekit-nan merge`` under real faults.

Each fault runs in a real process (``stock.start_child``: forked from a
server that has imported mergekit once) that is killed (SIGKILL) or
interrupted (SIGINT) right after its first output shard is on disk, or whose
writes fail (``RLIMIT_FSIZE``). Afterwards the inputs are byte-identical and
``OUT_PATH`` holds exactly what it held before: nothing, or the earlier model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from support import (
    STALL_MARKER,
    family_recipe,
    load_model_tensors,
    run_command,
    snapshot,
    start_child,
    wait_for,
    write_recipe,
)

from mergekit_nan.commands.common.output import PARTIAL, leftovers

SHARD = "20K"
"""Output shard size (parameters): the tiny model is written in several shards."""


def merge_arguments(recipe: Path, out: Path, *extra: str) -> List[str]:
    return [
        "merge",
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--out-shard-size",
        SHARD,
        *extra,
    ]


@pytest.fixture
def earlier(family, tmp_path) -> Path:
    """An output directory holding an earlier merge (ties+nan) and one more file."""
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "ties.yml", family_recipe(family, "ties+nan"))
    run_command("mergekit-nan", *merge_arguments(recipe, out), check=True)
    (out / "notes.txt").write_text("kept by the user")
    return out


def test_a_killed_merge_leaves_a_new_out_path_absent_and_says_so_next_time(family, tmp_path):
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    out = tmp_path / "merged"
    inputs = snapshot(*family)
    child = start_child(
        "mergekit-nan", *merge_arguments(recipe, out), cwd=tmp_path, stall_dir=tmp_path
    )
    wait_for(tmp_path / STALL_MARKER, child)
    (partial,) = leftovers(out)
    assert PARTIAL in partial.name and list(partial.glob("*.safetensors"))
    child.process.kill()
    assert child.wait() == -signal.SIGKILL
    assert not out.exists() and snapshot(*family) == inputs
    (tmp_path / STALL_MARKER).unlink()

    result = run_command("mergekit-nan", *merge_arguments(recipe, out), check=True)
    assert f"{partial} was left by an interrupted merge" in result.stderr
    assert set(load_model_tensors(out)) == set(load_model_tensors(family[0]))


@pytest.mark.parametrize("granularity", ["tensor", "model"])
def test_a_killed_overwrite_leaves_the_earlier_model(family, earlier, tmp_path, granularity):
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    before, inputs = snapshot(earlier), snapshot(*family)
    arguments = merge_arguments(recipe, earlier, "--overwrite", "--granularity", granularity)
    child = start_child("mergekit-nan", *arguments, cwd=tmp_path, stall_dir=tmp_path)
    wait_for(tmp_path / STALL_MARKER, child)
    child.process.kill()
    assert child.wait() == -signal.SIGKILL
    assert snapshot(earlier) == before and snapshot(*family) == inputs
    assert len(leftovers(earlier)) == 1


STOPS = {
    "interrupted": (signal.SIGINT, 130, "Interrupted"),  # Ctrl-C
    "terminated": (signal.SIGTERM, 143, "Terminated"),  # what kill, timeout and job schedulers send
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stopped_merge_says_one_line_and_leaves_the_earlier_model(
    family, earlier, tmp_path, stop
):
    sent, status, word = STOPS[stop]
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    before = snapshot(earlier)
    arguments = merge_arguments(recipe, earlier, "--overwrite")
    child = start_child("mergekit-nan", *arguments, cwd=tmp_path, stall_dir=tmp_path)
    wait_for(tmp_path / STALL_MARKER, child)
    assert (tmp_path / STALL_MARKER).read_text() == str(child.process.pid)
    os.kill(child.process.pid, sent)
    assert child.wait() == status, child.output
    assert child.output.strip().splitlines()[-1] == f"{word}: {earlier} was left as it was."
    assert "Traceback" not in child.output
    assert snapshot(earlier) == before and leftovers(earlier) == []  # no partial directory


def test_a_write_error_leaves_the_earlier_model(family, earlier, tmp_path):
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    before = snapshot(earlier)
    largest = max(p.stat().st_size for p in earlier.glob("*.safetensors"))
    child = start_child(
        "mergekit-nan",
        *merge_arguments(recipe, earlier, "--overwrite", "--out-shard-size", "5B"),
        cwd=tmp_path,
        file_size_limit=largest // 2,
    )
    assert child.wait() == 1
    last = child.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and last.endswith(f"{earlier} was left as it was")
    assert "File too large" in last or "too large" in last.lower()
    assert "Traceback" not in child.output
    assert snapshot(earlier) == before and leftovers(earlier) == []


def test_a_non_empty_out_path_is_refused_without_overwrite(family, earlier, tmp_path):
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    before = snapshot(earlier)
    result = run_command("mergekit-nan", *merge_arguments(recipe, earlier))
    assert result.returncode == 1
    assert "is not empty; pass --overwrite" in result.stderr.strip().splitlines()[-1]
    assert snapshot(earlier) == before


def test_overwrite_replaces_the_earlier_model_whole(family, earlier, tmp_path):
    recipe = write_recipe(tmp_path / "nan.yml", family_recipe(family))
    alone = tmp_path / "alone"
    run_command("mergekit-nan", *merge_arguments(recipe, alone), check=True)
    run_command("mergekit-nan", *merge_arguments(recipe, earlier, "--overwrite"), check=True)
    assert not (earlier / "notes.txt").exists()
    assert sorted(p.name for p in earlier.iterdir()) == sorted(p.name for p in alone.iterdir())
    ours, theirs = load_model_tensors(earlier), load_model_tensors(alone)
    assert all(ours[name].equal(theirs[name]) for name in theirs)
    assert leftovers(earlier) == []
    card = (earlier / "README.md").read_text()
    assert "mergekit-nan merge mergekit_config.yml OUT_PATH" in card and PARTIAL not in card


def test_ctrl_c_reaches_the_merge_when_the_test_run_itself_ignores_sigint(tmp_path):
    """The interrupt test, in a test run started with SIGINT ignored.

    A background job of a script (or a CI runner) starts with SIGINT ignored;
    the fork server behind :func:`support.start_child` then handed its children
    SIG_IGN, and the merge never saw the interrupt. This run needs an
    interpreter of its own: the disposition a process starts with is the point.
    """
    test = f"{Path(__file__).name}::test_a_stopped_merge_says_one_line_and_leaves_the_earlier_model[interrupted]"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=Path(__file__).parent,
        env={**os.environ, "PYTEST_ADDOPTS": f"--basetemp={tmp_path / 'run'}"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
