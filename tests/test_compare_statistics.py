"""compare's statistics on synthetic losses: the bootstrap, the half-split pick, the regime reading.

No model is merged: each test builds document losses whose answer it knows.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_nan.commands.compare.candidates import Candidate
from mergekit_nan.commands.compare.summary import regime_reading
from mergekit_nan.evaluation import DocumentLosses, half_split, interval, pick, resampled_sums


def test_resampled_sums_are_sums_over_seeded_draws():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 9.0]], dtype=torch.float64)
    tokens = torch.tensor([1, 2, 1, 3, 2])
    sums, totals = resampled_sums(DocumentLosses(nll, tokens), 7, torch.Generator().manual_seed(4))
    drawn = torch.randint(5, (7, 5), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(sums, nll[:, drawn].sum(dim=-1))
    assert torch.equal(totals, tokens[drawn].sum(dim=-1).double())
    assert interval(torch.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_the_half_split_pick_is_not_the_best_of_noise():
    """Twenty candidates as good as the baseline: the best on all documents looks better
    than it is; the pick measured on the other half does not."""
    generator = torch.Generator().manual_seed(0)
    full, held_out = [], []
    for _ in range(400):
        nll = 3.0 + torch.randn(21, 60, generator=generator, dtype=torch.float64)
        losses = DocumentLosses(nll, torch.ones(60, dtype=torch.long))
        selection, report = half_split(60, generator)
        assert sorted(torch.cat([selection, report]).tolist()) == list(range(60))
        loss = losses.loss()
        full.append(float(loss[1:].min() - loss[0]))
        chosen = pick([losses.subset(selection)], range(1, 21))
        reported = losses.subset(report).loss()
        held_out.append(float(reported[chosen] - reported[0]))
    standard_error = torch.tensor(held_out).std().item() / 400**0.5
    assert sum(full) / 400 < -0.15  # the best of 20 noises on the data that chose it
    assert abs(sum(held_out) / 400) < 4 * standard_error


def test_the_exponent_sweep_reads_the_regime_against_equal_weights():
    candidates = [
        Candidate("nan", "recipe", {"merge_method": "nan"}),
        Candidate("uniform", "baseline", {"merge_method": "task_arithmetic"}),
        Candidate("nan exponent=-1", "exponent", {"merge_method": "nan"}, value=-1.0),
    ]
    noise = torch.linspace(-0.001, 0.001, 101, dtype=torch.float64)
    spread = torch.stack([noise, noise, noise.flip(0)])  # -1's draws vary against the others'

    def reading(nan: float, uniform: float, minus_one: float) -> str:
        losses = torch.tensor([nan, uniform, minus_one], dtype=torch.float64)
        return regime_reading(candidates, 1, losses[:, None] + spread, losses)

    assert reading(1.00, 1.01, 1.02).startswith("The models look like NAN's regime")
    assert reading(1.02, 1.01, 1.00).startswith("The models look like the other regime")
    neither = reading(1.02, 1.00, 1.03)
    assert neither.startswith("The exponent sweep finds neither regime: uniform beats")
    assert "nan_exponent 1 by 0.0200 and -1 by 0.0300" in neither
    assert reading(1.01, 1.01, 1.0105).startswith("The exponent sweep cannot tell")
    assert regime_reading(candidates[:2], 1, torch.zeros(2, 3), torch.zeros(2)) is None
