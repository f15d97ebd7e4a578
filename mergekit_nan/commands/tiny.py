"""Tiny seeded Llama checkpoints: the demo's embedded default and the tests' fixtures.

A family is one random base model plus fine-tunes that add seeded Gaussian
task vectors of chosen sizes to every parameter (norm layers included, so no
task vector is zero). Every checkpoint carries a small word-level tokenizer
(built with the ``tokenizers`` library), so merges copy a tokenizer as they
would for a real model. Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["TINY_LLAMA", "tiny_llama_config", "tiny_tokenizer", "write_family", "write_model"]

TINY_LLAMA: Dict[str, int] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama_config(**overrides: int):
    """A ``transformers.LlamaConfig`` for the tiny shape (``overrides`` win)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides, "tie_word_embeddings": False})


def tiny_tokenizer(vocab_size: int = TINY_LLAMA["vocab_size"]):
    """A word-level fast tokenizer of ``vocab_size`` tokens: ``<unk>``, ``<s>``, ``</s>``, ``w3``..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    model = models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def write_model(
    path: Path,
    state: Dict[str, torch.Tensor],
    *,
    config=None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Optional[str] = None,
) -> Path:
    """Save ``state`` as a Hugging Face Llama checkpoint (safetensors) with a tokenizer."""
    from transformers import LlamaForCausalLM

    config = config or tiny_llama_config()
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def write_family(
    root: Path,
    delta_scales: Sequence[float] = (0.01, 0.02, 0.04),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    config=None,
    max_shard_size: Optional[str] = None,
) -> List[Path]:
    """Write ``root/base`` and ``root/ft{i}`` (base + N(0, scale_i^2) noise).

    Returns ``[base, ft0, ft1, ...]`` as absolute paths.
    """
    from transformers import LlamaForCausalLM

    config = config or tiny_llama_config()
    torch.manual_seed(seed)
    base_state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    save = dict(config=config, dtype=dtype, max_shard_size=max_shard_size)
    paths = [write_model(root / "base", base_state, **save)]
    generator = torch.Generator().manual_seed(seed + 1)
    for index, scale in enumerate(delta_scales):
        state = {
            name: tensor + scale * torch.randn(tensor.shape, generator=generator)
            for name, tensor in base_state.items()
        }
        paths.append(write_model(root / f"ft{index}", state, **save))
    return [p.resolve() for p in paths]
