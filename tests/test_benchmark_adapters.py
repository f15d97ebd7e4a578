"""Smoke test of the adapter benchmark at its tiny size: the rows it promises, finite numbers.

It checks that the script runs end to end; it asserts nothing about speed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

from support import BENCHMARKS, documented_arguments


def test_adapter_benchmark_runs_at_the_tiny_size(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "adapters_run", BENCHMARKS / "adapters" / "run.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    arguments = documented_arguments("adapters/run.py")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = script.main(
            [*arguments, "--cache", str(tmp_path), "--json", str(tmp_path / "r.json")]
        )
    assert code == 0
    text = output.getvalue()
    for row in ("adapter ", "base+adapter ", "base+adapter / adapter:", "max relative"):
        assert row in text
    results = json.loads((tmp_path / "r.json").read_text())
    for name in ("adapter", "base+adapter"):
        values = results["medians"][name]
        assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    # the adapter is smaller than the full model it replaces; bf16 rounding apart, they agree
    assert (
        results["medians"]["adapter"]["on_disk_bytes"]
        < results["medians"]["base+adapter"]["on_disk_bytes"]
    )
    assert results["difference"] < 0.05
