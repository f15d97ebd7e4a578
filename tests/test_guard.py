"""The stock mergekit-yaml and mergekit-multi speak up about NAN recipes, and only about them.

Every test runs the installed stock command as a user would, in this process
(``stock.run_command``), where the plugin is plugged in as by the start-up hook;
the byte-identity test runs it once more in an interpreter that never sees the
hook or the plugin.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List

import pytest
import yaml
from support import build_recipe, run_command, run_mergekit_yaml

from mergekit_nan.doctor import guard

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def guard_recipe(family: List[Path], method: str, *, base: bool = True, **parameters) -> Dict:
    """``method`` over the fine-tunes, each with weight 1.0; the base unless ``base=False``."""
    base_path, *tuned = family
    return build_recipe(
        tuned,
        method,
        base=base_path if base else None,
        weights=[1.0] * len(tuned),
        parameters=parameters,
    )


def plugin_lines(stderr: str) -> List[str]:
    return [
        line for line in stderr.splitlines() if "mergekit-nan" in line or "mergekit_nan" in line
    ]


def test_forgotten_plus_nan_is_logged_and_the_stock_merge_still_runs(family, tmp_path):
    config = guard_recipe(family, "ties", nan_exponent=2.0, density=0.5)
    out = tmp_path / "merged"
    result = run_mergekit_yaml(config, out)
    assert (out / "config.json").exists()
    (line,) = [x for x in plugin_lines(result.stderr) if "nan_exponent" in x]
    assert "did you mean `ties+nan`?" in line
    assert line.startswith("WARNING:mergekit_nan:")


def test_a_parameter_typo_is_logged_once_with_its_suggestion(family, tmp_path):
    config = guard_recipe(family, "nan", nan_exponet=2.0)
    for model in config["models"]:
        del model["parameters"]
    out = tmp_path / "merged"
    result = run_mergekit_yaml(config, out)
    assert (out / "config.json").exists()
    lines = [x for x in plugin_lines(result.stderr) if "nan_exponet" in x]
    assert len(lines) == 1, result.stderr
    assert "did you mean `nan_exponent`?" in lines[0]


def test_mergekit_multi_logs_the_warnings_of_its_stages(family, tmp_path):
    stage = guard_recipe(family, "ties", nan_norm="weights", density=0.5)
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump({"name": "stage", **stage}))
    result = run_command(
        "mergekit-multi",
        str(config),
        "--intermediate-dir",
        str(tmp_path / "work"),
        "--no-copy-tokenizer",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "work" / "stage" / "config.json").exists()
    assert any("did you mean `ties+nan`?" in x for x in plugin_lines(result.stderr))
    # Checked up front and again by the stage's run_merge: said once.
    assert sum("did you mean `ties+nan`?" in x for x in plugin_lines(result.stderr)) == 1


ERRORS = {
    "zero-total": (
        lambda f: (
            guard_recipe(f, "linear+nan", base=False) | {"models": _weights(f, [1.0, -1.0, 0.0])}
        ),
        "weight",
    ),
    "partial-weights": (
        lambda f: (
            guard_recipe(f, "ties+nan", density=0.5) | {"models": _weights(f, [1.0, None, 1.0])}
        ),
        "weight",
    ),
    "delta-without-base": (lambda f: guard_recipe(f, "nan", base=False, nan_norm="delta"), "base"),
    "overflowing-lambda": (lambda f: guard_recipe(f, "nan", **{"lambda": 1.0e300}), "lambda"),
    "granularity": (
        lambda f: guard_recipe(f, "nan", nan_granularity="model"),
        "mergekit-nan merge",
    ),
    "zero-priors-by-filter": (
        lambda f: (
            guard_recipe(f, "nan")
            | {"models": _weights(f, [[{"filter": "mlp", "value": 0.0}, {"value": 1.0}]] * 3)}
        ),
        "mlp",
    ),
}


def _weights(family: List[Path], weights) -> List[Dict]:
    return [
        {"model": str(p), **({} if w is None else {"parameters": {"weight": w}})}
        for p, w in zip(family[1:], weights)
    ]


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_definite_error_of_a_nan_recipe_stops_before_anything_is_written(case, family, tmp_path):
    build, word = ERRORS[case]
    out = tmp_path / "merged"
    result = run_mergekit_yaml(build(family), out, check=False)
    assert result.returncode != 0
    assert "cannot be merged as written" in result.stderr or "nan_granularity" in result.stderr
    assert word in result.stderr.split("Traceback")[-1]
    assert "function-after" not in result.stderr
    assert not out.exists()


def _without_plugin(config_path: Path, out: Path) -> subprocess.CompletedProcess:
    """Stock mergekit-yaml in an interpreter that never sees the plugin (no .pth processing)."""
    program = (
        "import sys\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "from mergekit.scripts.run_yaml import main\n"
        "try:\n"
        "    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    assert not [m for m in sys.modules if 'mergekit_nan' in m], 'plugin loaded'\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", program, str(config_path), str(out), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env=ENV,
    )


def test_a_plain_stock_recipe_is_untouched_byte_for_byte(family, tmp_path):
    # The model card names the output directory and lists the models in set order,
    # which mergekit does not fix from run to run: its lines are compared as a multiset.
    config = guard_recipe(family, "ties", density=0.5)
    with_plugin = tmp_path / "with" / "merged"
    result = run_mergekit_yaml(config, with_plugin)
    assert plugin_lines(result.stderr) == []
    without = tmp_path / "without" / "merged"
    bare = _without_plugin(tmp_path / "with" / "merged.yml", without)
    assert bare.returncode == 0, bare.stderr[-3000:]
    names = sorted(p.name for p in with_plugin.iterdir())
    assert names == sorted(p.name for p in without.iterdir()) and "config.json" in names
    for name in names:
        ours, theirs = (with_plugin / name).read_bytes(), (without / name).read_bytes()
        if name == "README.md":
            ours, theirs = sorted(ours.splitlines()), sorted(theirs.splitlines())
        assert ours == theirs, name


class _MovedPlanner:
    """A planner whose internals are not what the guard expects."""

    config = None


@pytest.mark.guard_skips
def test_the_guard_falls_silent_when_mergekit_internals_move(caplog, guard_skips):
    assert guard._start(_MovedPlanner()) is None
    # Below mergekit's default WARNING level: shown only with -v.
    assert caplog.records == [] or all(r.levelno < logging.WARNING for r in caplog.records)
    (skipped,) = guard_skips
    assert skipped.startswith("mergekit-nan: the recipe guard skipped the recipe's checks before")
    assert "AttributeError" in skipped and "model_dump" in skipped


def _stock_command_whose_check_fails(config_path: Path, out: Path, *extra: str):
    """mergekit-yaml in a new interpreter, with ``mergekit-nan check`` broken as if mergekit moved."""
    program = (
        "import sys\n"
        "from mergekit_nan.doctor import check\n"
        "def moved(*args, **kwargs):\n"
        "    raise AttributeError('mergekit moved')\n"
        "check.check_recipe = moved\n"
        "from mergekit.scripts.run_yaml import main\n"
        "from mergekit_nan.doctor.guard import install_guard\n"
        "install_guard()\n"
        "main(sys.argv[1:])\n"
    )
    arguments = [str(config_path), str(out), "--no-copy-tokenizer", *extra]
    return subprocess.run(
        [sys.executable, "-c", program, *arguments], capture_output=True, text=True, env=ENV
    )


def test_with_v_the_stock_command_says_which_checks_the_guard_skipped(family, tmp_path):
    path = tmp_path / "nan.yml"
    path.write_text(yaml.safe_dump(guard_recipe(family, "nan")))
    quiet = _stock_command_whose_check_fails(path, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert plugin_lines(quiet.stderr) == []
    verbose = _stock_command_whose_check_fails(path, tmp_path / "verbose", "-v")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert plugin_lines(verbose.stderr) == [
        "INFO:mergekit_nan:mergekit-nan: the recipe guard skipped the recipe's checks before "
        "the merge (AttributeError: mergekit moved)"
    ]
    assert (tmp_path / "verbose" / "config.json").exists()


def test_installing_the_guard_twice_wraps_the_planner_once():
    from mergekit.plan import MergePlanner

    guard.install_guard()
    wrapped = MergePlanner._plan
    guard.install_guard()
    assert MergePlanner._plan is wrapped and wrapped._mergekit_nan
    assert not getattr(wrapped.__wrapped__, "_mergekit_nan", False)


def test_mergekit_nan_merge_reports_each_finding_once(family, tmp_path):
    """merge runs the checks itself, then merges with the guard suspended."""
    config = guard_recipe(family, "nan", nan_exponet=2.0)
    path = tmp_path / "typo.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    result = run_command(
        "mergekit-nan", "merge", str(path), str(out), "--no-copy-tokenizer", "--no-write-model-card"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").exists()
    lines = [x for x in result.stderr.splitlines() if "nan_exponet" in x]
    assert len(lines) == 1 and "did you mean `nan_exponent`?" in lines[0], result.stderr
