"""Model, training and evaluation of the language-model quality benchmark.

The model is a ``transformers`` ``LlamaForCausalLM`` over bytes (vocabulary
257: the 256 byte values and a document separator), trained on CPU with plain
torch. :class:`Settings` holds every size of a run (:data:`SIZES`).

* :func:`pretrain`: the base model, from a seeded initialisation, AdamW with
  weight decay 0.1, linear warm-up over 5% of the steps, cosine decay to 10%.
* :func:`finetune`: an expert from the base, AdamW without weight decay at a
  constant learning rate (so the task vector is what the data did to the
  base), for a given number of steps over successive shuffled epochs.
* :func:`evaluate`: mean next-token cross-entropy in nats per token (= per
  byte, separators included) over non-overlapping windows.

Checkpoints are written with ``save_pretrained(..., safe_serialization=True)``
(config and ``model.safetensors``, no tokenizer) and read back with
``safetensors``. Every random draw takes an explicit seed, so the same settings
and seed give the same models (mergekit's ``--random-seed`` reseeds torch's
global generator in-process, which these functions never use unseeded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from quality_lm_data import SEPARATOR, VOCAB_SIZE, batches
from safetensors.torch import load_file
from torch.nn import functional
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """Sizes of one run. Byte volumes are tokens (one byte, one token)."""

    seeds: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    """Tokens per training and evaluation window."""
    batch_size: int
    pretrain_bytes: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_lr: float
    epochs: int
    """Passes over its data of every expert in the ``epochs`` regime; in the ``steps``
    regime every expert makes the steps of this many passes over the geometric mean of
    the experiment's volumes."""
    unit_bytes: int
    """Data volume of the smallest expert of the three-domain experiment."""
    ratios: Tuple[int, ...]
    pair_unit_bytes: int
    """Data volume of the smaller model of the one-domain experiment."""
    pair_ratios: Tuple[int, ...]
    val_bytes: int
    test_bytes: int
    lambdas: Tuple[float, ...]
    """The ``lambda`` grid each merge method is tuned on (validation split)."""
    density: float
    """``density`` of ties / dare_ties and their +nan versions."""
    min_gain: Optional[float]
    """Each expert must beat the base on its own domain's validation split by this much
    (nats per byte); None: only report it."""

    lora_rank: int = 0
    """0: experts are full fine-tunes; else PEFT LoRA adapters of this rank on every
    linear module of every layer (``lora_alpha`` twice the rank)."""
    lora_lr_factor: float = 4.0
    """LoRA experts train at ``finetune_lr`` times this (adapters need a larger step)."""

    def config(self) -> LlamaConfig:
        """The model's ``LlamaConfig`` (untied embeddings, no dropout, float32)."""
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=SEPARATOR,
            eos_token_id=SEPARATOR,
            pad_token_id=None,
            dtype="float32",
        )

    def train_bytes(self) -> int:
        """Bytes every expert domain's train split must hold."""
        return max(self.unit_bytes * max(self.ratios), self.pair_unit_bytes * sum(self.pair_ratios))


_COMMON = dict(heads=4, context=128, batch_size=16, pretrain_lr=3e-3, density=0.5)
SIZES: Dict[str, Settings] = {
    "full": Settings(
        seeds=3,
        hidden=192,
        layers=4,
        intermediate=512,
        pretrain_bytes=3_000_000,
        pretrain_steps=2500,
        finetune_lr=5e-4,
        epochs=2,
        unit_bytes=16_384,
        ratios=(1, 4, 16),
        pair_unit_bytes=28_672,
        pair_ratios=(1, 8),
        val_bytes=12_288,
        test_bytes=24_576,
        lambdas=(0.5, 1.0, 1.5, 2.0, 3.0),
        min_gain=0.05,
        **_COMMON,
    ),
    "small": Settings(
        seeds=2,
        hidden=96,
        layers=3,
        intermediate=256,
        pretrain_bytes=800_000,
        pretrain_steps=400,
        finetune_lr=5e-4,
        epochs=2,
        unit_bytes=8_192,
        ratios=(1, 4, 16),
        pair_unit_bytes=14_336,
        pair_ratios=(1, 8),
        val_bytes=8_192,
        test_bytes=12_288,
        lambdas=(0.5, 1.0, 2.0),
        min_gain=0.02,
        **_COMMON,
    ),
    "tiny": Settings(
        seeds=1,
        hidden=32,
        layers=2,
        intermediate=64,
        pretrain_bytes=40_000,
        pretrain_steps=20,
        finetune_lr=1e-3,
        epochs=1,
        unit_bytes=1_024,
        ratios=(1, 2, 4),
        pair_unit_bytes=1_024,
        pair_ratios=(1, 2),
        val_bytes=1_024,
        test_bytes=1_024,
        lambdas=(1.0, 2.0),
        min_gain=None,
        **{**_COMMON, "heads": 2, "context": 64, "batch_size": 8},
    ),
}


def quiet_transformers() -> None:
    """No progress bars or info messages from ``transformers`` (saving, loading)."""
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def new_model(settings: Settings, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model (``seed`` fixes the initial weights)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(settings.config())
    return model.float()


def parameter_count(settings: Settings) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(settings.config())
    return sum(p.numel() for p in model.parameters())


def _loss(model: LlamaForCausalLM, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def _train(
    model: LlamaForCausalLM,
    rows: torch.Tensor,
    steps: int,
    settings: Settings,
    seed: int,
    *,
    lr: float,
    weight_decay: float,
    schedule: bool,
) -> None:
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
    )
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if not schedule:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    model.train()
    for step, batch in enumerate(batches(rows, settings.batch_size, steps, seed)):
        for group in optimiser.param_groups:
            group["lr"] = lr * factor(step)
        optimiser.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    model.eval()


def pretrain(rows: torch.Tensor, settings: Settings, seed: int) -> LlamaForCausalLM:
    """The base model: ``settings.pretrain_steps`` steps on the pool's windows."""
    model = new_model(settings, seed)
    _train(
        model,
        rows,
        settings.pretrain_steps,
        settings,
        seed,
        lr=settings.pretrain_lr,
        weight_decay=0.1,
        schedule=True,
    )
    return model


def finetune(
    base: State, rows: torch.Tensor, steps: int, settings: Settings, seed: int
) -> LlamaForCausalLM:
    """An expert: the base fine-tuned for ``steps`` steps on ``rows`` (constant lr, no decay)."""
    model = new_model(settings, seed)
    model.load_state_dict(base)
    _train(
        model,
        rows,
        steps,
        settings,
        seed,
        lr=settings.finetune_lr,
        weight_decay=0.0,
        schedule=False,
    )
    return model


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def finetune_lora(base: State, rows: torch.Tensor, steps: int, settings: Settings, seed: int):
    """A LoRA expert: a PEFT adapter of rank ``settings.lora_rank`` on the base, trained
    like :func:`finetune` (constant lr ``finetune_lr * lora_lr_factor``, no decay)."""
    import peft

    model = new_model(settings, seed)
    model.load_state_dict(base)
    config = peft.LoraConfig(
        r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules=list(LORA_TARGETS)
    )
    torch.manual_seed(seed)  # PEFT draws A with the global generator
    lora = peft.get_peft_model(model, config)
    _train(
        lora,
        rows,
        steps,
        settings,
        seed,
        lr=settings.finetune_lr * settings.lora_lr_factor,
        weight_decay=0.0,
        schedule=False,
    )
    return lora


@torch.inference_mode()
def evaluate(model: LlamaForCausalLM, rows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean cross-entropy of every next token of ``rows``, in nats."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start : start + batch_size]
        logits = model(input_ids=chunk[:, :-1]).logits
        total += float(
            functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += chunk[:, 1:].numel()
    return total / count


def save(model: LlamaForCausalLM, path: Path) -> Path:
    """Write ``model`` as a safetensors checkpoint (config and weights) into ``path``."""
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def load_state(path: Path) -> State:
    """Every tensor of the safetensors checkpoint in ``path`` (all shards)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: State = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def state_of(model: LlamaForCausalLM) -> State:
    """A detached copy of the model's weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
