"""Smoke tests of compare's benchmarks at their tiny size.

They check that the scripts run end to end, that compare and the by-hand side
agree on every candidate's loss, and that a merge with shared norms writes
what a merge alone writes; they assert nothing about speed.
"""

from __future__ import annotations

import json
import math

import pytest
from support import documented_arguments, run_benchmark


def test_cost_benchmark_runs_both_sides_at_the_tiny_size(tmp_path):
    out = tmp_path / "cost.json"
    arguments = documented_arguments("compare/cost.py")
    stdout = run_benchmark("cost.py", *arguments, "--cache", str(tmp_path), "--json", str(out))
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


def test_shared_norms_benchmark_merges_the_same_tensors_both_ways(tmp_path):
    out = tmp_path / "shared.json"
    arguments = documented_arguments("compare/shared_norms.py")
    stdout = run_benchmark(
        "shared_norms.py", *arguments, "--cache", str(tmp_path), "--json", str(out)
    )
    payload = json.loads(out.read_text())
    assert payload["same"] == {"nan_exponent -1": True, "nan_granularity layer": True}
    for label, ways in payload["runs"].items():
        assert len(ways["alone"]) == len(ways["shared"]) == 1
        assert f"| {label} | " in stdout
    assert not (tmp_path / "compare-shared-norms-tiny").exists()
