"""Smoke test of the language-model quality benchmark at its tiny size.

Runs ``benchmarks/quality_lm/quality_lm.py --size tiny`` (the line of ``docs/benchmarks.md``) in this process (imported via
``sys.path`` like the other benchmark tests) and checks the pipeline: every
experiment, regime and merge method reported with finite losses, every expert
evaluated, the JSON written, the checkpoints deleted. It asserts nothing about
which merge is better.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
from support import documented_arguments, imported_benchmark

EXPERIMENTS = ("three-domain", "one-domain")
REGIMES = ("epochs", "steps")
DOMAINS = ("c-headers", "licences", "package-docs")


@pytest.fixture
def quality_lm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with imported_benchmark(monkeypatch, "quality_lm.py") as module:
        yield module


def test_quality_lm_tiny(
    quality_lm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merges = importlib.import_module("quality_lm_merges")
    work, out = tmp_path / "work", tmp_path / "quality_lm.json"
    arguments = documented_arguments("quality_lm.py")  # the line of docs/benchmarks.md
    status = quality_lm.main([*arguments, "--out", str(work), "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    if status == 2 and "is too small on this machine" in stderr:
        pytest.skip(stderr.strip().splitlines()[-1])  # e.g. no C headers installed
    assert status == 0, stderr[-4000:]

    # Markdown: a loss table per experiment and regime, the paired, norm and coefficient tables.
    for experiment in EXPERIMENTS:
        for regime in REGIMES:
            assert f"### {experiment}, regime {regime}" in stdout
    for heading in ("### Paired by seed", "### Task-vector norm", "### NAN coefficients"):
        assert heading in stdout
    assert "cores" in stdout and "wall time" in stdout and "seeds: 1" in stdout
    assert "every expert beats the base on its own domain" in stdout
    assert "linear merges (task arithmetic, oracle, nan at every granularity)" in stdout
    three, one = merges.three_domain_methods(), merges.one_domain_methods()
    for method in three:
        assert f"| {method.label} |" in stdout
        if method.label != merges.UNIFORM:
            assert f"| {method.label} vs {merges.UNIFORM} |" in stdout
        if method.reference is not None:
            assert f"| {method.label} vs {method.reference} |" in stdout
    for label in ("nan (layer, p=2)", "nan (model, p=1)", "ties+nan", "dare_ties+nan"):
        assert label in {m.label for m in three}
    assert {m.merge_method for m in three} >= {"task_arithmetic", "nan", "ties", "ties+nan"}

    # JSON: finite losses for base, experts and every method, in every setting.
    payload = json.loads(out.read_text())
    losses = {(r["experiment"], r["regime"], r["model"], r["domain"]): r for r in payload["losses"]}
    assert all(math.isfinite(v) for r in payload["losses"] for v in r["seeds"].values())
    for regime in REGIMES:
        for method in three:
            for domain in DOMAINS:
                assert losses[("three-domain", regime, method.label, domain)]["seeds"].keys() == {
                    "0"
                }
        for domain in DOMAINS:
            assert ("three-domain", regime, f"expert {domain} alone", domain) in losses
            assert ("three-domain", regime, "base", domain) in losses
        for method in one:
            assert ("one-domain", regime, method.label, "package-docs") in losses
        for label in ("expert 1x alone", "expert 2x alone", "base"):
            assert ("one-domain", regime, label, "package-docs") in losses

    # Every expert trained, evaluated and described; lambdas from the grid; merges checked.
    experts = payload["experts"]
    assert len(experts) == len(REGIMES) * (3 + 2)
    for expert in experts:
        for field in ("own_loss", "base_own_loss", "norm", "alpha_model_p1", "alpha_tensor_p1"):
            assert math.isfinite(expert[field])
        assert expert["steps"] > 0 and expert["volume"] > 0
    assert {e["domain"] for e in experts if e["experiment"] == "three-domain"} == set(DOMAINS)
    grid = set(payload["lambda_grid"])
    assert all(set(r["seeds"].values()) <= grid for r in payload["chosen_lambdas"])
    n_merges = len(REGIMES) * len(grid) * (len(three) + len(one))
    assert payload["merges"] == n_merges
    assert len(payload["validation"]) == n_merges
    linear = [m for m in three if m.linear], [m for m in one if m.linear]
    assert len(payload["checks"]) == len(REGIMES) * len(grid) * (len(linear[0]) + len(linear[1]))
    assert all(c["deviation"] < 1e-3 for c in payload["checks"])
    assert payload["corpora"]["licences"]["test_files"] > 0

    # Without --keep, nothing is left behind (the work directory did not exist before).
    assert not work.exists()

    # --combine prints one report from several runs' JSON: here the run and a copy as seed 1.
    shifted = json.loads(out.read_text().replace('"0": ', '"1": '))
    shifted.update(experts=[{**x, "seed": 1} for x in payload["experts"]], wall_s=1.0)
    (tmp_path / "seed1.json").write_text(json.dumps(shifted))
    both = tmp_path / "both.json"
    combine = ["--combine", str(out), str(tmp_path / "seed1.json"), "--json", str(both)]
    assert quality_lm.main(combine) == 0
    combined = capsys.readouterr().out
    assert "seeds: 2" in combined and "(sum of 2 runs)" in combined
    merged = json.loads(both.read_text())
    assert merged["merges"] == 2 * n_merges and len(merged["experts"]) == 2 * len(experts)
    assert merged["wall_s"] == payload["wall_s"] + 1.0
    for row in merged["losses"]:
        (single,) = [
            r
            for r in payload["losses"]
            if r["model"] == row["model"]
            and (r["experiment"], r["regime"], r["domain"])
            == (row["experiment"], row["regime"], row["domain"])
        ]
        assert row["seeds"] == {"0": single["seeds"]["0"], "1": single["seeds"]["0"]}
    headings = [
        line for line in combined.splitlines() if line.startswith("### ") and "regime" in line
    ]
    assert headings == [f"### {e}, regime {r}" for e in EXPERIMENTS for r in REGIMES]


def test_compare_step_scores_the_bytes_the_models_were_trained_on(
    quality_lm: ModuleType, tmp_path: Path
) -> None:
    """--compare's held-out pieces, read and tokenized as compare does, are the original bytes."""
    from mergekit_nan.doctor.heldout import load_documents

    step = importlib.import_module("quality_lm_compare")
    documents = [bytes(range(256)) * 2 + b"\xff\xfe tail", b"short\n\tline\r\n"]
    pieces = step.held_out_file(tmp_path / "test.jsonl", documents, context=100)
    assert pieces == 7
    tokenizer = step.byte_tokenizer()
    read = load_documents(str(tmp_path / "test.jsonl"))
    ids = [tokenizer(d.text)["input_ids"] for d in read]
    expected = [doc[start : start + 100] for doc in documents for start in range(0, len(doc), 100)]
    assert ids == [list(piece) for piece in expected]


def test_quality_lm_tiny_with_lora_experts(
    quality_lm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lora-rank: the experts are PEFT adapters, each merge one adapter (mergekit-nan merge)."""
    merges = importlib.import_module("quality_lm_merges")
    work, out = tmp_path / "work", tmp_path / "lora.json"
    arguments = ["--size", "tiny", "--lora-rank", "4", "--experiment", "one-domain"]
    arguments += ["--regime", "steps", "--out", str(work), "--json", str(out)]
    status = quality_lm.main(arguments)
    stdout, stderr = capsys.readouterr()
    if status == 2 and "is too small on this machine" in stderr:
        pytest.skip(stderr.strip().splitlines()[-1])
    assert status == 0, stderr[-4000:]
    assert "experts: LoRA adapters of rank 4" in stdout
    methods = merges.adapter_methods(merges.one_domain_methods())
    assert methods and all(m.linear for m in methods)
    payload = json.loads(out.read_text())
    assert payload["settings"]["lora_rank"] == 4
    assert payload["merges"] == len(payload["lambda_grid"]) * len(methods)
    # each merged adapter, folded into the base by PEFT, against float64 from the experts
    assert len(payload["checks"]) == payload["merges"]
    assert all(c["deviation"] < 1e-5 for c in payload["checks"])
    assert not work.exists()


def test_accuracy_task_asks_for_the_true_next_bytes_among_other_documents(
    quality_lm: ModuleType, tmp_path: Path
) -> None:
    """--accuracy's questions: each window's context, its true last bytes among three
    distractors cut at the same place from windows of other documents, written for lm-eval."""
    import yaml

    step = importlib.import_module("quality_lm_compare")
    documents = [bytes([65 + d]) * 20 + bytes(range(d * 40, d * 40 + 40)) for d in range(4)]
    name = step.choice_task(tmp_path, "some-domain", documents, context=30, seed=1)
    assert name == "qlm_some_domain"
    config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    assert config["task"] == name and config["output_type"] == "multiple_choice"
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    windows = [(d, doc[s : s + 30]) for d, doc in enumerate(documents) for s in (0, 30)]
    assert len(rows) == len(windows)
    prefix = 30 - step.CONTINUATION
    for row, (number, window) in zip(rows, windows):
        assert row["context"].encode("latin-1") == window[:prefix]
        choices = [c.encode("latin-1") for c in row["choices"]]
        assert len(choices) == 4 and choices[row["gold"]] == window[prefix:]
        ends = {w[prefix:]: d for d, w in windows}
        others = [c for i, c in enumerate(choices) if i != row["gold"]]
        assert all(ends[c] != number for c in others)


def test_quality_lm_tiny_compare_with_accuracy(
    quality_lm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compare --accuracy: compare --task scores each domain's multiple-choice task."""
    pytest.importorskip("lm_eval")
    work, out = tmp_path / "work", tmp_path / "accuracy.json"
    arguments = ["--size", "tiny", "--experiment", "three-domain", "--regime", "steps"]
    arguments += ["--compare", "--accuracy", "--out", str(work), "--json", str(out)]
    status = quality_lm.main(arguments)
    stdout, stderr = capsys.readouterr()
    if status == 2 and "is too small on this machine" in stderr:
        pytest.skip(stderr.strip().splitlines()[-1])
    assert status == 0, stderr[-4000:]
    (entry,) = json.loads(out.read_text())["compare"]
    tasks = {f"qlm_{d.replace('-', '_')}" for d in DOMAINS}
    assert set(entry["nan_accuracy"]) == tasks
    for label in ("uniform", "nan"):
        assert all(0 <= entry["accuracy"][label][t] <= 1 for t in tasks)
    assert "accuracy minus uniform's" in stdout
