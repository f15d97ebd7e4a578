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


def _prepared(labels_kinds, documents: int):
    from mergekit_nan.commands.compare.candidates import CandidateSet
    from mergekit_nan.commands.compare.settings import HeldOutFile, Prepared

    candidates = tuple(
        Candidate(label, kind, {"merge_method": label}, value=value)
        for label, kind, value in labels_kinds
    )
    held_out = HeldOutFile("a.txt", ((3, 4),) * documents, 0)
    return Prepared(CandidateSet(candidates, 1), (held_out,), "tokenizer")


SWEEP = [("nan", "recipe", None), ("uniform", "baseline", None),
         ("nan exponent=-1", "exponent", -1.0)]  # fmt: skip


def _summary(prepared, nll: torch.Tensor):
    from mergekit_nan.commands.compare.summary import summarize

    tokens = torch.ones(nll.shape[-1], dtype=torch.long)
    losses = [[DocumentLosses(row, tokens)] for row in nll]
    return summarize(prepared, losses, seed=0, resamples=200)


def _selection(prepared, documents: int) -> torch.Tensor:
    """The selection half summarize draws for this seed (it depends on nothing else)."""
    flat = torch.zeros(len(prepared.candidates.candidates), documents, dtype=torch.float64)
    return torch.tensor(_summary(prepared, flat).pick.selection[0])


@pytest.mark.parametrize("other_half", ["worse", "better"])
def test_the_pick_wins_only_if_it_beats_the_baseline_on_the_other_half(other_half):
    """The defect: a pick clearly worse than the baseline where it was not chosen was the
    winner (JSON and --keep). Now the baseline wins, and the last line says so."""
    from mergekit_nan.commands.compare.report import to_json, verdict_lines

    documents = 40
    prepared = _prepared(SWEEP, documents)
    selection = _selection(prepared, documents)
    report = torch.tensor(sorted(set(range(documents)) - set(selection.tolist())))
    generator = torch.Generator().manual_seed(1)
    nll = 3.0 + 0.01 * torch.randn(3, documents, generator=generator, dtype=torch.float64)
    nll[2, selection] -= 1.0  # exponent -1 looks best on the half that chooses
    nll[2, report] += 0.5 if other_half == "worse" else -0.5
    summary = _summary(prepared, nll)
    assert summary.pick.split and summary.pick.index == 2
    expected = float(nll[2, report].mean() - nll[1, report].mean())
    assert summary.pick.overall.diff == pytest.approx(expected)
    data = to_json(summary)
    last = verdict_lines(summary)[-1]
    if other_half == "worse":
        assert summary.pick.overall.verdict == "worse"
        assert summary.winner == 1 and data["winner"] == "uniform"
        assert last.startswith(
            "Use uniform: nan exponent=-1, the best merge on one half of the documents"
        )
        assert (
            f"is worse than it in held-out loss on the other half ({expected:+.4f} nats/token"
            in last
        )
    else:
        assert summary.winner == 2 and data["winner"] == "nan exponent=-1"
        assert last.startswith("Use nan exponent=-1: it beats uniform in held-out loss on the half")
    assert data["decision"]["reason"] == last


def test_with_two_candidates_the_recipe_wins_only_if_it_clearly_beats_the_baseline():
    from mergekit_nan.commands.compare.report import verdict_lines

    prepared = _prepared(SWEEP[:2], 30)
    generator = torch.Generator().manual_seed(2)
    nll = 3.0 + torch.randn(2, 30, generator=generator, dtype=torch.float64)
    unclear = _summary(prepared, nll)
    assert unclear.pick.overall.verdict == "unclear" and unclear.winner == 1
    assert verdict_lines(unclear)[-1].startswith(
        "Use uniform: nan does not clearly beat it in held-out loss"
    )
    nll[0] = nll[1] - 0.1
    clear = _summary(prepared, nll)
    assert clear.winner == 0
    last = verdict_lines(clear)[-1]
    assert last.startswith("Use nan: it beats uniform in held-out loss by 0.1000 nats/token")
