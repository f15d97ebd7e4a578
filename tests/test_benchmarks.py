"""Smoke tests of the benchmark scripts at their tiny size: expected rows, finite numbers.

They check that the scripts run end to end and report what they promise;
they never assert anything about speed or accuracy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PAIRS = ("nan vs linear", "ties+nan vs ties", "dare_ties+nan vs dare_ties")
METHODS = ("nan", "linear", "ties+nan", "ties", "dare_ties+nan", "dare_ties")


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _finite(values: List[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def test_overhead_tiny(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    stdout = _run(
        "overhead.py",
        "--size",
        "tiny",
        "--rounds",
        "1",
        "--norm-repeats",
        "1",
        "--probe-repeats",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(out),
    )
    for pair in PAIRS:
        assert f"| {pair} |" in stdout
    assert "| NAN coefficient pass" in stdout and "| plain read" in stdout
    payload = json.loads(out.read_text())
    assert sorted(m["method"] for m in payload["merges"]) == sorted(METHODS)
    for merge in payload["merges"]:
        assert merge["wall_s"] > 0 and merge["max_rss"] > 0
    norms = payload["norm_pass"]
    assert _finite([norms["plain_gb_s"], norms["nan_gb_s"]])
    assert norms["plain_gb_s"] > 0 and norms["nan_gb_s"] > 0
    assert {"cpu", "cores", "ram", "torch", "date"} <= set(payload["machine"])
    probes = payload["largest_tensor_peak_growth"]
    assert set(probes) == set(METHODS) and all(v >= 0 for vs in probes.values() for v in vs)


def test_overhead_cuda_flag_needs_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the flag is exercised by the full run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "overhead.py"),
            "--size",
            "tiny",
            "--cuda",
            "--cache",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--cuda needs a CUDA device" in result.stderr


def test_quality_tiny(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    out = tmp_path / "quality.json"
    stdout = _run("quality.py", "--size", "tiny", "--json", str(out))
    for heading in ("multi-task, protocol steps", "same-task, protocol epochs"):
        assert f"### {heading}" in stdout
    for row in (
        "oracle (weight ~ data volume)",
        "nan (delta, p=1) [default]",
        "nan (weights, p=2)",
        "ties+nan",
        "task arithmetic (uniform)",
    ):
        assert f"| {row} |" in stdout
    payload = json.loads(out.read_text())
    accuracies = [v for row in payload["accuracies"] for v in row["values"]]
    assert _finite(accuracies) and all(0.0 <= v <= 1.0 for v in accuracies)
    tasks = {row["task"] for row in payload["accuracies"]}
    assert tasks == {"digits", "wine", "breast_cancer", "iris"}
    readings = {(r["experiment"], r["protocol"], r["nan_norm"]) for r in payload["spearman"]}
    assert len(readings) == 8
    rhos = [v for row in payload["spearman"] for v in row["values"]]
    assert all(-1.0 <= v <= 1.0 for v in rhos if math.isfinite(v))
