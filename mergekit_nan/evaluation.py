"""Held-out loss of several models on the same documents, with honest uncertainty.

Plain torch, no mergekit: the statistics behind ``mergekit-nan compare``.

* :func:`document_losses` turns one batch of a causal LM's logits into each
  document's summed negative log-likelihood of tokens 2..n (float64 sums of
  float32 log-probabilities) and its count of predicted tokens.
* A file's loss is ``sum_d nll_d / sum_d tokens_d``: nats per token over every
  predicted token of the file, not a mean of per-document means.
* :func:`resampled_sums` draws bootstrap resamples of a file's documents
  (with replacement, seeded) and returns each resample's sums for every
  candidate at once: the same resampled documents for all, so the difference
  of two candidates on one resample is a *paired* bootstrap draw. Sums of
  several files add up to a resample of all of them, stratified by file.
* :func:`interval` is the 95 % percentile interval of a statistic's draws.
* :func:`half_split` splits a file's documents into a selection half and a
  report half (seeded); :func:`pick` chooses the lowest loss on the selection
  halves, so the gain then measured on the report halves is not the maximum
  of noise over the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

__all__ = [
    "DocumentLosses",
    "document_losses",
    "half_split",
    "interval",
    "pick",
    "resampled_sums",
]

POSITIONS_AT_ONCE = 256
"""Positions whose log-probabilities :func:`document_losses` computes at once."""

_CHUNK_ELEMENTS = 1 << 22
"""Resample-by-document weights built at once (32 MiB of float64)."""


@dataclass(frozen=True)
class DocumentLosses:
    """Per document: the summed NLL (nats) of its predicted tokens, and their number.

    ``nll`` is float64 of shape ``(candidates, documents)`` or ``(documents,)``;
    ``tokens`` is int64 ``(documents,)``, the same for every candidate.
    """

    nll: torch.Tensor
    tokens: torch.Tensor

    def loss(self) -> torch.Tensor:
        """Nats per token: total NLL over total predicted tokens (per candidate)."""
        return self.nll.sum(dim=-1) / self.tokens.sum()

    def subset(self, documents: torch.Tensor) -> DocumentLosses:
        """The losses of the documents at ``documents`` (indices)."""
        return DocumentLosses(self.nll[..., documents], self.tokens[documents])


def document_losses(
    logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int]
) -> Tuple[List[float], List[int]]:
    """Each row's NLL sum of tokens 2..n given the tokens before, and n - 1.

    ``logits`` is ``(batch, positions, vocabulary)`` for ``input_ids``
    ``(batch, positions)``; row ``b`` holds a document of ``lengths[b]`` tokens
    from position 0 (anything after it is padding and ignored). Each token's
    ``-log p = logsumexp(logits) - logit(target)`` in float32 (or the logits'
    wider dtype), :data:`POSITIONS_AT_ONCE` positions at a time (temporaries of
    that many rows of the vocabulary, whatever the batch), summed in float64.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = input_ids.to(logits.device)
    sums, counts = [], []
    for row, length in enumerate(lengths):
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, length - 1, POSITIONS_AT_ONCE):
            end = min(start + POSITIONS_AT_ONCE, length - 1)
            piece = logits[row, start:end].to(dtype)
            chosen = piece.gather(-1, targets[row, start + 1 : end + 1].unsqueeze(-1)).squeeze(-1)
            total += (torch.logsumexp(piece, dim=-1) - chosen).to(torch.float64).sum()
        sums.append(float(total))
        counts.append(length - 1)
    return sums, counts


def resampled_sums(
    losses: DocumentLosses, resamples: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap sums ``(nll (candidates, resamples), tokens (resamples,))``.

    Each resample draws as many documents as there are, uniformly with
    replacement, from ``generator``; every candidate sees the same draws.
    """
    nll = losses.nll.reshape(-1, losses.nll.shape[-1]).to(torch.float64)
    tokens = losses.tokens.to(torch.float64)
    documents = tokens.numel()
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // max(documents, 1)))
    nll_sums, token_sums = [], []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = torch.randint(documents, (size, documents), generator=generator)
        counts = torch.zeros(size, documents, dtype=torch.float64)
        counts.scatter_add_(1, drawn, torch.ones(size, documents, dtype=torch.float64))
        nll_sums.append(nll @ counts.T)
        token_sums.append(counts @ tokens)
    return torch.cat(nll_sums, dim=1), torch.cat(token_sums)


def interval(draws: torch.Tensor) -> Tuple[float, float]:
    """The 2.5 % and 97.5 % quantiles of ``draws`` (1-D): a 95 % percentile interval."""
    low, high = torch.quantile(draws.to(torch.float64), torch.tensor([0.025, 0.975]).double())
    return float(low), float(high)


def half_split(documents: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``range(documents)``: (selection half, report half), each sorted.

    The selection half has ``documents // 2`` documents, the report half the rest.
    """
    order = torch.randperm(documents, generator=generator)
    half = documents // 2
    return order[:half].sort().values, order[half:].sort().values


def pick(selection: Sequence[DocumentLosses], candidates: Sequence[int]) -> int:
    """The candidate (index into the rows) with the lowest loss over all selection halves.

    The loss pools every file's selection documents: total NLL over total tokens.
    """
    nll = sum(part.nll.sum(dim=-1) for part in selection)
    tokens = sum(part.tokens.sum() for part in selection)
    losses = nll / tokens
    return min(candidates, key=lambda row: (float(losses[row]), row))
