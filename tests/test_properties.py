"""Property-based tests of the NAN math (hypothesis): what must hold for any inputs.

alpha_i = w_i ||x_i||^-p / sum_j w_j ||x_j||^-p sums to one, follows the models
when they are permuted, ignores a common scale of the x_i, is ordered
inversely to the norms for p > 0, and does not depend on how the norm pass
cuts the tensors into chunks.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_nan.coefficients import coefficients_from_norms, frobenius_norms, tensor_coefficients

NORMS = st.lists(
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=2,
    max_size=8,
)
EXPONENTS = st.floats(min_value=0.0, max_value=4.0, allow_nan=False)
POSITIVE_EXPONENTS = st.floats(min_value=0.05, max_value=4.0, allow_nan=False)


def alphas(norms, exponent, prior=None) -> list:
    values = torch.tensor(norms, dtype=torch.float64)
    weights = None if prior is None else torch.tensor(prior, dtype=torch.float64)
    return coefficients_from_norms(values, exponent=exponent, prior=weights).tolist()


def tensors_for(seed: int, count: int, numel: int, with_base: bool):
    """``count`` float32 tensors (and a base) whose task vectors differ in size."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator)
    scales = torch.rand(count, generator=generator) * 0.5 + 1e-3
    tuned = [base + s * torch.randn(numel, generator=generator) for s in scales.tolist()]
    return tuned, (base if with_base else None)


@settings(max_examples=200, deadline=None)
@given(norms=NORMS, exponent=EXPONENTS, data=st.data())
def test_coefficients_sum_to_one(norms, exponent, data):
    prior = data.draw(st.lists(st.floats(0.01, 100.0), min_size=len(norms), max_size=len(norms)))
    assert math.isclose(math.fsum(alphas(norms, exponent, prior)), 1.0, rel_tol=1e-12)
    assert all(a >= 0 for a in alphas(norms, exponent, prior))


@settings(max_examples=200, deadline=None)
@given(norms=NORMS, exponent=EXPONENTS, data=st.data())
def test_coefficients_follow_a_permutation_of_the_models(norms, exponent, data):
    order = data.draw(st.permutations(range(len(norms))))
    prior = data.draw(st.lists(st.floats(0.01, 100.0), min_size=len(norms), max_size=len(norms)))
    original = alphas(norms, exponent, prior)
    permuted = alphas([norms[i] for i in order], exponent, [prior[i] for i in order])
    for position, index in enumerate(order):
        assert math.isclose(permuted[position], original[index], rel_tol=1e-12, abs_tol=1e-300)


@settings(max_examples=200, deadline=None)
@given(norms=NORMS, exponent=EXPONENTS, factor=st.floats(1e-3, 1e3))
def test_a_common_scale_of_the_norms_changes_nothing(norms, exponent, factor):
    scaled = alphas([n * factor for n in norms], exponent)
    for a, b in zip(scaled, alphas(norms, exponent)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)


@settings(max_examples=200, deadline=None)
@given(norms=NORMS, exponent=POSITIVE_EXPONENTS)
def test_coefficients_are_ordered_inversely_to_the_norms(norms, exponent):
    result = alphas(norms, exponent)
    for a in range(len(norms)):
        for b in range(len(norms)):
            if norms[a] < norms[b]:
                assert result[a] >= result[b]
            if norms[a] == norms[b]:
                assert math.isclose(result[a], result[b], rel_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(2, 5),
    numel=st.integers(1, 3000),
    with_base=st.booleans(),
    factor=st.sampled_from([0.125, 0.5, 2.0, 8.0, 1024.0]),
    exponent=POSITIVE_EXPONENTS,
)
def test_scaling_every_task_vector_by_one_factor_changes_nothing(
    seed, count, numel, with_base, factor, exponent
):
    """x_i -> c * x_i for every i leaves the coefficients as they are."""
    # Inputs on a coarse grid, so every theta_i, theta_base + factor * x_i and every
    # difference is exact in float32: only the norm pass itself may round.
    generator = torch.Generator().manual_seed(seed)
    origin = torch.randint(-1000, 1000, (numel,), generator=generator).float()
    if not with_base:
        origin = torch.zeros(numel)
    deltas = [
        torch.randint(-50, 51, (numel,), generator=generator).float() / 8 for _ in range(count)
    ]
    deltas = [d if bool(d.any()) else d + 1 for d in deltas]
    base = origin if with_base else None
    before = tensor_coefficients([origin + d for d in deltas], base, exponent=exponent)
    after = tensor_coefficients([origin + factor * d for d in deltas], base, exponent=exponent)
    assert torch.allclose(before, after, rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(1, 4),
    numel=st.integers(1, 5000),
    chunk=st.integers(1, 6000),
    with_base=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
)
def test_norms_do_not_depend_on_the_chunk_size(seed, count, numel, chunk, with_base, dtype):
    tuned, base = tensors_for(seed, count, numel, with_base)
    tuned = [t.to(dtype) for t in tuned]
    base = None if base is None else base.to(dtype)
    reference = [
        math.sqrt(
            math.fsum((t.double() - (0 if base is None else base.double())).square().tolist())
        )
        for t in tuned
    ]
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for norm, expected in zip(frobenius_norms(tuned, base, chunk=chunk).tolist(), reference):
        assert math.isclose(norm, expected, rel_tol=tolerance, abs_tol=1e-30)
