"""Tiny random checkpoints of several architectures.

Used by the compatibility matrix (``test_compat.py``, ``test_compat_paths.py``).
A family is a seeded random base plus fine-tunes that add Gaussian noise to
*every* tensor (norms and biases included). The noise scale differs per model
and, by a seeded factor, per tensor, so NAN coefficients differ from tensor to
tensor. Everything is built offline from ``transformers`` configs; a family is
written once per test session and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

VOCAB = 96
MODEL_SCALES = (0.004, 0.01, 0.025)
"""Task-vector sizes of the fine-tunes (the base's entries are about 0.02-1)."""
ADDED_TOKENS = ("<tool>", "</tool>", "<think>", "</think>")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
"""The token-indexed tensors of the Llama-like architectures (rows are tokens)."""

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
)

ARCHITECTURES: Dict[str, Tuple[str, str, Dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {**_LLAMA_LIKE, "tie_word_embeddings": False},
    ),
    # tied embeddings and q/k/v biases
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    # q_norm/k_norm
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 8, "tie_word_embeddings": False},
    ),
    # tied embeddings, q/k norms and four norms per layer
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 8, "tie_word_embeddings": True},
    ),
    # fused qkv_proj and gate_up_proj
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    # Conv1D weights (in x out), transformer.h.N names, tied embeddings
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=2,
            eos_token_id=3,
        ),
    ),
}
"""Architecture name -> (transformers config class, model class, tiny settings)."""


def tiny_config(arch: str, **overrides):
    """The tiny ``transformers`` config of ``arch`` (``overrides`` win)."""
    import transformers

    config_class, model_class, settings = ARCHITECTURES[arch]
    settings = {**settings, "architectures": [model_class], **overrides}
    return getattr(transformers, config_class)(**settings)


def saved_state(config, seed: int) -> Dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write for ``config`` (no tied copies), seeded.

    The model's own initialisation leaves biases at 0 and norms at 1, so seeded
    noise is added to every tensor: no tensor is constant.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor.detach() + 0.02 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in state.items()
    }


def fine_tuned(
    base: Dict[str, torch.Tensor], scale: float, generator: torch.Generator
) -> Dict[str, torch.Tensor]:
    """``base`` plus N(0, (scale * f_t)^2) noise, f_t drawn per tensor from [0.5, 2]."""
    state = {}
    for name, tensor in base.items():
        factor = float(torch.empty(()).uniform_(0.5, 2.0, generator=generator))
        state[name] = tensor + scale * factor * torch.randn(tensor.shape, generator=generator)
    return state


def write_checkpoint(
    path: Path,
    state: Dict[str, torch.Tensor],
    config,
    dtype: torch.dtype,
    *,
    shards: int = 1,
    pickle: bool = False,
) -> Path:
    """Write ``state`` in ``dtype`` with ``config.json``: safetensors (one file or
    ``shards`` files plus an index) or, with ``pickle``, ``pytorch_model.bin``."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    state = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
    if pickle:
        torch.save(state, path / "pytorch_model.bin")
    elif shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: state[name] for name in names[index::shards]}
            save_file(part, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        size = sum(t.numel() * t.element_size() for t in state.values())
        index_data = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    return path.resolve()


def checkpoint_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: safetensors files, else ``pytorch_model.bin``."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return torch.load(path / "pytorch_model.bin", weights_only=True)
    tensors: Dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def word_tokenizer(added: Sequence[str] = ()):
    """A WordLevel tokenizer of ``VOCAB`` words (``added`` as added tokens on top)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
    model = models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.add_tokens(list(added))
    return fast


@dataclass(frozen=True)
class Family:
    """A base and its fine-tunes, all in ``dtype``."""

    arch: str
    dtype: torch.dtype
    base: Path
    tuned: Tuple[Path, ...]

    @property
    def paths(self) -> List[Path]:
        return [self.base, *self.tuned]


class Families:
    """Tiny families built on first request and kept for the session.

    ``get(arch, dtype, layout)``: ``layout`` is ``"safetensors"``, ``"sharded"``
    (three shards and an index) or ``"bin"`` (``pytorch_model.bin``). The same
    seeds give the same values in every dtype and layout (up to rounding).
    ``with_added_tokens(arch)``: a float32 family with a tokenizer each, whose
    last fine-tune adds :data:`ADDED_TOKENS` and has its embeddings resized.
    """

    def __init__(self, root: Path):
        self._root = root
        self._states: Dict[str, List[Dict[str, torch.Tensor]]] = {}
        self._built: Dict[tuple, Family] = {}

    def states(self, arch: str) -> List[Dict[str, torch.Tensor]]:
        """float32 [base, ft0, ft1, ft2] of ``arch`` (the seed depends on the name only)."""
        if arch not in self._states:
            seed = sum(map(ord, arch))
            base = saved_state(tiny_config(arch), seed)
            generator = torch.Generator().manual_seed(seed + 1)
            self._states[arch] = [base] + [fine_tuned(base, s, generator) for s in MODEL_SCALES]
        return self._states[arch]

    def get(
        self, arch: str, dtype: torch.dtype = torch.float32, layout: str = "safetensors"
    ) -> Family:
        key = (arch, dtype, layout)
        if key not in self._built:
            folder = self._root / f"{arch}-{str(dtype).split('.')[-1]}-{layout}"
            options = {"sharded": {"shards": 3}, "bin": {"pickle": True}}.get(layout, {})
            config = tiny_config(arch)
            paths = [
                write_checkpoint(folder / name, state, config, dtype, **options)
                for name, state in zip(("base", "ft0", "ft1", "ft2"), self.states(arch))
            ]
            self._built[key] = Family(arch, dtype, paths[0], tuple(paths[1:]))
        return self._built[key]

    def with_added_tokens(self, arch: str) -> Family:
        """Llama-like ``arch`` only (the rows of :data:`VOCAB_TENSORS` are resized)."""
        key = (arch, "added-tokens")
        if key not in self._built:
            folder = self._root / f"{arch}-added-tokens"
            states = [dict(state) for state in self.states(arch)]
            generator = torch.Generator().manual_seed(99)
            wide = states[-1]
            for name, tensor in wide.items():
                if name in VOCAB_TENSORS:
                    extra = 0.02 * torch.randn(
                        len(ADDED_TOKENS), tensor.shape[1], generator=generator
                    )
                    wide[name] = torch.cat([tensor, extra])
            paths = []
            for index, (name, state) in enumerate(zip(("base", "ft0", "ft1", "ft2"), states)):
                last = index == len(states) - 1
                vocab = VOCAB + (len(ADDED_TOKENS) if last else 0)
                path = write_checkpoint(
                    folder / name, state, tiny_config(arch, vocab_size=vocab), torch.float32
                )
                word_tokenizer(ADDED_TOKENS if last else ()).save_pretrained(path)
                paths.append(path)
            self._built[key] = Family(arch, torch.float32, paths[0], tuple(paths[1:]))
        return self._built[key]
