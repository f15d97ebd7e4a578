"""The options that mirror mergekit's ``MergeOptions`` are derived from mergekit, not copied.

Each is compared with the option the stock ``mergekit-yaml`` builds for the same
field (``mergekit.options.add_merge_options``): same declarations, default and
help text, except where a command says so in its own words. A field that
mergekit adds to ``MergeOptions`` becomes an option of ``merge`` and reaches
``MergeOptions`` without a change to our code.
"""

from __future__ import annotations

from typing import Dict, Optional

import click
import mergekit.options
import pytest
from click.testing import CliRunner
from mergekit.options import OPTION_HELP, MergeOptions, add_merge_options

from mergekit_nan.commands.cli import main
from mergekit_nan.commands.common.options import merge_options, mergekit_options, writing_options

# The help texts that are a command's own words, and the fields spelled --name alone.
OWN_WORDS = {
    "inspect": {"device", "cuda", "multi_gpu"},
    "freeze": {"device", "cuda", "multi_gpu"},
    "merge": {"device", "cuda", "multi_gpu", "write_model_card"},
    "compare": {"device", "cuda", "multi_gpu"},
}
PLAIN_SWITCHES = {"cuda", "multi_gpu", "trust_remote_code", "allow_crimes", "quiet"}


def stock_options() -> Dict[str, click.Option]:
    """The options mergekit-yaml has, by MergeOptions field."""

    @add_merge_options
    def probe(merge_options):  # pragma: no cover - never called
        return merge_options

    return {option.name: option for option in probe.__click_params__}


@pytest.mark.parametrize("command", sorted(OWN_WORDS))
def test_every_mirrored_option_is_mergekits_own(command):
    stock = stock_options()
    mirrored = [p for p in main.commands[command].params if p.name in MergeOptions.model_fields]
    assert {"device", "cuda", "quiet", "trust_remote_code"} <= {p.name for p in mirrored}
    for ours in mirrored:
        theirs = stock[ours.name]
        assert ours.default == theirs.default, ours.name
        if ours.name in OWN_WORDS[command]:
            assert ours.help != OPTION_HELP[ours.name], ours.name
        else:
            assert ours.help == OPTION_HELP[ours.name] == theirs.help, ours.name
        if ours.name in PLAIN_SWITCHES:
            assert ours.opts[0] == theirs.opts[0] and ours.secondary_opts == [], ours.name
        else:
            assert (ours.opts, ours.secondary_opts) == (theirs.opts, theirs.secondary_opts)
            assert isinstance(ours.type, type(theirs.type)), ours.name


def test_merge_has_every_field_of_mergekits_options():
    given = {p.name for p in main.commands["merge"].params}
    # verbosity is -v/--verbose: INFO logging and tracebacks.
    assert set(MergeOptions.model_fields) - given == {"verbosity"}
    assert "verbose" in given


def test_merge_options_take_every_field_given():
    arguments = {"verbose": False, "device": "cpu", "num_threads": 3, "out_shard_size": 20_000}
    options = merge_options({**arguments, "rank": 4, "random_seed": 7})
    assert (options.num_threads, options.out_shard_size, options.random_seed) == (3, 20_000, 7)
    assert options.write_model_card is True  # a field not given keeps mergekit's default


def test_a_field_mergekit_adds_becomes_an_option_of_merge(monkeypatch):
    class Extended(MergeOptions, frozen=True):
        smoothing_passes: Optional[int] = 2

    monkeypatch.setattr(mergekit.options, "MergeOptions", Extended)
    monkeypatch.setitem(OPTION_HELP, "smoothing_passes", "Smooth the merge this many times")
    seen = []

    @click.command()
    @writing_options()
    @mergekit_options
    def command(**arguments):
        seen.append(merge_options(arguments))

    option = next(p for p in command.params if p.name == "smoothing_passes")
    assert option.opts == ["--smoothing-passes"] and option.default == 2
    assert option.help == "Smooth the merge this many times"
    result = CliRunner().invoke(command, ["--smoothing-passes", "5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert isinstance(seen[0], Extended) and seen[0].smoothing_passes == 5


@pytest.mark.parametrize("size, parameters", [("20K", 20_000), ("3M", 3_000_000), ("7", 7)])
def test_out_shard_size_reads_mergekits_sizes(size, parameters):
    seen = []

    @click.command()
    @writing_options()
    @mergekit_options
    def command(**arguments):
        seen.append(merge_options(arguments).out_shard_size)

    assert CliRunner().invoke(command, ["--out-shard-size", size]).exit_code == 0
    assert CliRunner().invoke(command, []).exit_code == 0
    assert seen == [parameters, 5_000_000_000]


def test_a_bad_shard_size_is_one_error_line(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\n")
    result = CliRunner().invoke(
        main, ["merge", str(recipe), str(tmp_path / "out"), "--out-shard-size", "5Q"]
    )
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for '--out-shard-size'")
    assert "'5Q' is not a number of parameters" in last
    assert not (tmp_path / "out").exists()
