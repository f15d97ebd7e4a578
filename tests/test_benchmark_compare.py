"""Smoke test of compare's cost benchmark at its tiny size: both sides run and score the same tokens.

It checks that the script runs end to end and that compare and the by-hand
side agree on every candidate's loss; it asserts nothing about speed.
"""

from __future__ import annotations

import json
import math

import pytest
from test_benchmarks import _run, documented_arguments


def test_cost_benchmark_runs_both_sides_at_the_tiny_size(tmp_path):
    out = tmp_path / "cost.json"
    arguments = documented_arguments("compare/cost.py")
    stdout = _run("cost.py", *arguments, "--cache", str(tmp_path), "--json", str(out))
    payload = json.loads(out.read_text())
    labels = ["nan", "uniform", "nan exponent=-1"]
    assert list(payload["losses"]["compare"]) == labels
    for label in labels:
        compared, by_hand = payload["losses"]["compare"][label], payload["losses"]["by_hand"][label]
        assert math.isfinite(compared) and compared == pytest.approx(by_hand, rel=1e-6)
    (compare,) = payload["results"]["compare"]
    (by_hand,) = payload["results"]["by_hand"]
    assert len(compare["runs"]) == 1 and len(by_hand["runs"]) == 4  # 3 merges + the loop
    for side in (compare, by_hand):
        assert side["wall"] > 0 and side["rss"] > 0 and side["cpu"] > 0
    assert "compare / by hand: wall ratio" in stdout
    assert not (tmp_path / "compare-cost-tiny").exists()  # the work directory is removed
