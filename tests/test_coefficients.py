"""The pure NAN math against an independent float64 computation."""

from __future__ import annotations

import pytest
import torch
from support import nan_weights

from mergekit_nan.coefficients import (
    NonFiniteInputError,
    coefficients_from_norms,
    frobenius_norms,
    tensor_coefficients,
)


def reference(tensors, base=None, exponent=1.0, prior=None):
    """float64 NAN coefficients (``support.nan_weights``) as a tensor."""
    return torch.tensor(
        nan_weights(tensors, base, priors=prior, exponent=exponent), dtype=torch.float64
    )


def family(seed, n=3, shape=(33, 17), scales=(0.01, 0.03, 0.1), dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    tuned = [base + s * torch.randn(shape, generator=generator) for s in scales[:n]]
    return base.to(dtype), [t.to(dtype) for t in tuned]


def max_rel(actual, expected):
    return float(((actual.double() - expected).abs() / expected.abs().clamp_min(1e-300)).max())


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0, -1.0, 0.5])
@pytest.mark.parametrize("with_base", [True, False])
def test_coefficients_match_float64_reference(exponent, with_base):
    for seed in range(5):
        base, tuned = family(seed)
        expected = reference(tuned, base if with_base else None, exponent)
        actual = tensor_coefficients(tuned, base if with_base else None, exponent=exponent)
        assert actual.dtype == torch.float32
        assert max_rel(actual, expected) < 2e-6
        assert float(actual.sum()) == pytest.approx(1.0, abs=1e-6)


def test_inverse_norm_orders_models():
    base, tuned = family(0)
    alpha = tensor_coefficients(tuned, base)
    # task vectors grow with the model index, so coefficients must shrink
    assert alpha[0] > alpha[1] > alpha[2] > 0


def test_priors_multiply_the_estimate():
    base, tuned = family(1)
    prior = [2.0, 0.5, 1.0]
    expected = reference(tuned, base, 1.0, prior)
    assert max_rel(tensor_coefficients(tuned, base, prior=prior), expected) < 2e-6
    # a zero prior removes a model entirely
    alpha = tensor_coefficients(tuned, base, prior=[0.0, 1.0, 1.0])
    assert float(alpha[0]) == 0.0
    assert max_rel(alpha[1:], reference(tuned[1:], base)) < 2e-6


def test_float64_inputs_stay_float64():
    base, tuned = family(2, dtype=torch.float64)
    alpha = tensor_coefficients(tuned, base)
    assert alpha.dtype == torch.float64
    assert max_rel(alpha, reference(tuned, base)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_accumulated_without_overflow(dtype):
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    generator = torch.Generator().manual_seed(3)
    tuned = [
        (big * (0.2 + 0.8 * torch.rand(64, 64, generator=generator))).to(dtype) for _ in range(3)
    ]
    assert all(torch.isfinite(t).all() for t in tuned)
    norms = frobenius_norms(tuned)
    expected = torch.tensor([t.double().norm() for t in tuned], dtype=torch.float64)
    assert torch.isfinite(norms).all()
    assert max_rel(norms, expected) < 1e-5
    assert max_rel(tensor_coefficients(tuned), reference(tuned)) < 1e-5


def test_small_task_vectors_do_not_cancel():
    generator = torch.Generator().manual_seed(4)
    base = 1.0e3 * torch.randn(256, 256, generator=generator)
    tuned = [base + s * torch.randn(256, 256, generator=generator) for s in (1e-3, 3e-3)]
    expected = torch.tensor([(t.double() - base.double()).norm() for t in tuned])
    assert max_rel(frobenius_norms(tuned, base), expected) < 1e-5
    # the expanded formula |a|^2 - 2<a,b> + |b|^2 loses everything in float32
    a, b = tuned[0], base
    expanded = (a * a).sum() - 2 * (a * b).sum() + (b * b).sum()
    assert abs(float(expanded.clamp_min(0).sqrt()) - float(expected[0])) / float(expected[0]) > 0.1


def test_chunking_does_not_change_the_result():
    base, tuned = family(5, shape=(101, 37))
    whole = frobenius_norms(tuned, base, chunk=1 << 30)
    chunked = frobenius_norms(tuned, base, chunk=97)
    assert torch.allclose(whole, chunked, rtol=1e-6, atol=0)


def test_non_contiguous_inputs():
    base, tuned = family(6, shape=(40, 30))
    transposed = [t.t() for t in tuned]
    assert not transposed[0].is_contiguous()
    expected = reference(transposed, base.t())
    assert max_rel(tensor_coefficients(transposed, base.t()), expected) < 2e-6


def test_zero_norm_inputs_get_zero_and_the_rest_renormalise():
    base, tuned = family(7)
    tuned[1] = base.clone()  # no task vector
    alpha = tensor_coefficients(tuned, base)
    assert float(alpha[1]) == 0.0
    expected = reference([tuned[0], tuned[2]], base)
    assert max_rel(alpha[[0, 2]], expected) < 2e-6
    # the rule holds for a plain average (p = 0) too
    alpha0 = tensor_coefficients(tuned, base, exponent=0.0)
    assert alpha0.tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_all_zero_norms_fall_back_to_the_priors():
    base, _ = family(8)
    alpha = tensor_coefficients([base.clone(), base.clone()], base, prior=[3.0, 1.0])
    assert alpha.tolist() == pytest.approx([0.75, 0.25])
    zeros = [torch.zeros(5, 5), torch.zeros(5, 5), torch.zeros(5, 5)]
    assert tensor_coefficients(zeros).tolist() == pytest.approx([1 / 3] * 3)


def test_extreme_norms_and_exponents_stay_finite():
    norms = torch.tensor([1e-30, 1e-20, 1.0])
    alpha = coefficients_from_norms(norms, exponent=4.0)
    assert torch.isfinite(alpha).all()
    assert alpha.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    alpha = coefficients_from_norms(torch.tensor([1e30, 3e30]), exponent=-2.0)
    assert alpha.tolist() == pytest.approx([0.1, 0.9], rel=1e-6)


def test_batched_rows():
    norms = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    alpha = coefficients_from_norms(norms)
    assert alpha[0].tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert alpha[1].tolist() == pytest.approx([1 / 3] * 3)
    assert alpha[2].tolist() == pytest.approx([0.5, 0.0, 0.5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_named(bad):
    base, tuned = family(9)
    tuned[2] = tuned[2].clone()
    tuned[2][3, 4] = bad
    with pytest.raises(NonFiniteInputError) as info:
        frobenius_norms(tuned, base)
    assert info.value.indices == (2,) and not info.value.base
    poisoned = base.clone()
    poisoned[0, 0] = bad
    with pytest.raises(NonFiniteInputError) as info:
        frobenius_norms(tuned[:2], poisoned)
    assert info.value.base and info.value.indices == ()


def test_invalid_arguments():
    base, tuned = family(10)
    with pytest.raises(ValueError, match="nan_exponent must be finite"):
        tensor_coefficients(tuned, base, exponent=float("inf"))
    with pytest.raises(ValueError, match="not all zero"):
        tensor_coefficients(tuned, base, prior=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        tensor_coefficients(tuned, base, prior=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="expected 3 prior weights"):
        tensor_coefficients(tuned, base, prior=[1.0, 1.0])
    with pytest.raises(TypeError, match="floating-point"):
        frobenius_norms([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="at least one"):
        frobenius_norms([])


def test_long_tensors_keep_float32_norms_accurate():
    # one long float32 reduction drifts by ~1e-4 over millions of elements
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(4096, 1024, generator=generator).bfloat16()
    tuned = [(base.float() + 0.01 * torch.randn(4096, 1024, generator=generator)).bfloat16()]
    expected = (tuned[0].double() - base.double()).norm()
    assert max_rel(frobenius_norms(tuned, base), expected.reshape(1)) < 1e-6
    assert max_rel(frobenius_norms(tuned), tuned[0].double().norm().reshape(1)) < 1e-6


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0, -1.0])
def test_one_row_in_python_floats_equals_the_batched_tensor_path(exponent):
    generator = torch.Generator().manual_seed(11)
    for count in (1, 2, 5):
        norms = torch.rand(count, generator=generator, dtype=torch.float64) * 10
        norms[0] = 0.0 if count > 2 else norms[0]
        prior = torch.rand(count, generator=generator, dtype=torch.float64) + 0.1
        one = coefficients_from_norms(norms, exponent=exponent, prior=prior)
        batched = coefficients_from_norms(norms[None], exponent=exponent, prior=prior[None])[0]
        assert torch.allclose(one, batched, rtol=1e-14, atol=0)
