"""The core's reading of precomputed norms (``mergekit_nan.weighting``) against plain arithmetic.

``norm_weighting`` is what ``group_weighting`` (full models) and the adapter path
(norms of LoRA factors) both call; ``Weighting.update_coefficients`` is ``nan``'s
multiplier of each task vector, with the zero-norm rule; ``weight_total`` is the
scale of ``<method>+nan``.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_nan.errors import RecipeError, TensorError
from mergekit_nan.weighting import norm_weighting, weight_total

MODELS = ("a", "b", "c")


def _reading(norms, **settings):
    settings = {
        "tensor": "blk.w",
        "exponent": 1.0,
        "scale": 1.0,
        "scales_weights": False,
        **settings,
    }
    return norm_weighting(MODELS, torch.tensor(norms, dtype=torch.float64), **settings)


def test_shares_priors_and_multipliers_of_given_norms():
    # w_i / n_i = (1, 1/3, 0): shares 3/4, 1/4 and 0 for the zero task vector.
    weighting = _reading([1.0, 3.0, 0.0], prior=[1.0, 1.0, 2.0], scale=0.5, delta=True)
    assert weighting.shares == pytest.approx((0.75, 0.25, 0.0), rel=1e-15)
    assert weighting.priors == (1.0, 1.0, 2.0)
    assert weighting.norms == (1.0, 3.0, 0.0)
    assert weighting.update_coefficients() == pytest.approx((0.375, 0.125, 0.0), rel=1e-15)
    squared = _reading([1.0, 3.0, 0.0], exponent=2.0)  # 1 / n_i^2 = (1, 1/9, 0)
    assert squared.shares == pytest.approx((0.9, 0.1, 0.0), rel=1e-15)


def test_composite_weights_are_shares_times_the_total():
    weighting = _reading([1.0, 3.0, 1.0], scale=2.0, scales_weights=True)
    assert weighting.shares == pytest.approx((3 / 7, 1 / 7, 3 / 7), rel=1e-15)
    assert weighting.weights == pytest.approx((6 / 7, 2 / 7, 6 / 7), rel=1e-15)


def test_zero_norm_rule_for_task_vectors_only():
    # Every norm zero: the shares fall back to the priors; a zero task vector still adds
    # nothing, while whole tensors (no base) are averaged by the priors.
    deltas = _reading([0.0, 0.0, 0.0], prior=[1.0, 1.0, 2.0], delta=True)
    assert deltas.shares == pytest.approx((0.25, 0.25, 0.5), rel=1e-15)
    assert deltas.update_coefficients() == (0.0, 0.0, 0.0)
    tensors = _reading([0.0, 0.0, 0.0], prior=[1.0, 1.0, 2.0], delta=False)
    assert tensors.update_coefficients() == pytest.approx((0.25, 0.25, 0.5), rel=1e-15)


def test_pooled_shares_keep_each_tensors_own_zero_updates():
    own = _reading([0.0, 1.0, 1.0], scale=2.0, delta=True)
    pooled = own.with_norms([1.0, 1.0, 2.0])  # 1 / n = (1, 1, 1/2): shares 0.4, 0.4, 0.2
    assert pooled.shares == pytest.approx((0.4, 0.4, 0.2), rel=1e-15)
    assert pooled.update_coefficients(own.norms) == pytest.approx((0.0, 0.8, 0.4), rel=1e-15)
    assert pooled.update_coefficients() == pytest.approx((0.8, 0.8, 0.4), rel=1e-15)


def test_zero_priors_name_the_tensor():
    with pytest.raises(TensorError, match=r"not all zero \(tensor 'blk\.w'\)"):
        _reading([1.0, 2.0, 3.0], prior=[0.0, 0.0, 0.0])


def test_weight_total_is_the_given_sum_else_one():
    assert weight_total("ties+nan", "blk.w", [("a", 0.5), ("b", 1.5)], torch.float32) == 2.0
    assert weight_total("ties+nan", "blk.w", [("a", None), ("b", None)], torch.float32) == 1.0
    with pytest.raises(TensorError, match=r"'blk\.w' has a weight for some models but not for b;"):
        weight_total("ties+nan", "blk.w", [("a", 1.0), ("b", None)], torch.float32)
    with pytest.raises(RecipeError, match=r"the weight total is 0 for tensor 'blk\.w'"):
        weight_total("ties+nan", "blk.w", [("a", 1.0), ("b", -1.0)], torch.float32)
    with pytest.raises(RecipeError, match=r"the weight total = 1e\+39 overflows float32"):
        weight_total("ties+nan", "blk.w", [("a", 1e39), ("b", 0.0)], torch.float32)
