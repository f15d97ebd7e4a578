"""Seeded Llama-shaped checkpoints for the overhead benchmark.

A family is a base model and fine-tunes (base plus Gaussian task vectors),
written as sharded bf16 safetensors with an index file and a ``config.json``,
tensor by tensor from seeded generators: no model object is ever built, so a
3B-parameter family needs only a few shards' worth of memory to write.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

INIT_STD = 0.02
"""Standard deviation of the base's matrices (vectors are ones, as a fresh norm layer)."""


@dataclass(frozen=True)
class Shape:
    """Sizes of a Llama-shaped model (the ``LlamaForCausalLM`` layout of transformers)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    shard_parameters: int
    num_key_value_heads: Optional[int] = None
    tie_word_embeddings: bool = False

    @property
    def kv_size(self) -> int:
        """Output rows of ``k_proj``/``v_proj`` (grouped-query attention)."""
        heads = self.num_key_value_heads or self.num_attention_heads
        return heads * (self.hidden_size // self.num_attention_heads)

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """Names and shapes of the checkpoint, in file order."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        out: List[Tuple[str, Tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, h))
        ]
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            out += [
                (f"{prefix}.self_attn.q_proj.weight", (h, h)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, h)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, h)),
                (f"{prefix}.self_attn.o_proj.weight", (h, h)),
                (f"{prefix}.mlp.gate_proj.weight", (i, h)),
                (f"{prefix}.mlp.up_proj.weight", (i, h)),
                (f"{prefix}.mlp.down_proj.weight", (h, i)),
                (f"{prefix}.input_layernorm.weight", (h,)),
                (f"{prefix}.post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    def parameters(self) -> int:
        """Total parameter count."""
        return sum(numel(shape) for _, shape in self.tensors())

    def largest_tensor(self) -> Tuple[str, int]:
        """Name and element count of the biggest tensor (the first one on ties)."""
        name, shape = max(self.tensors(), key=lambda item: numel(item[1]))
        return name, numel(shape)

    def config(self) -> Dict[str, object]:
        """The ``config.json`` contents of a matching ``LlamaForCausalLM``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads or self.num_attention_heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
        }


@dataclass(frozen=True)
class Family:
    """A base shape and the task-vector scale of each fine-tune."""

    shape: Shape
    delta_scales: Tuple[float, ...]
    """Task-vector std of each fine-tune, relative to the base weights' std."""
    description: str

    @property
    def inputs(self) -> int:
        """Checkpoints a merge reads: the base and every fine-tune."""
        return 1 + len(self.delta_scales)


FAMILIES: Dict[str, Family] = {
    "tiny": Family(
        Shape(256, 64, 128, 2, 4, shard_parameters=50_000),
        (0.1, 0.2, 0.4),
        "Llama-shaped, 2 layers, hidden 64",
    ),
    "134m": Family(
        Shape(
            49152,
            576,
            1536,
            30,
            9,
            shard_parameters=100_000_000,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
        (0.1, 0.2, 0.4),
        "SmolLM-135M-shaped Llama, 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV "
        "heads, vocabulary 49152, tied embeddings",
    ),
    "full": Family(
        Shape(32000, 1024, 2816, 24, 16, shard_parameters=100_000_000),
        (0.1, 0.2, 0.4),
        "Llama-shaped, 24 layers, hidden 1024, intermediate 2816, vocabulary 32000",
    ),
    "3b": Family(
        Shape(
            128256,
            3072,
            8192,
            28,
            24,
            shard_parameters=500_000_000,
            num_key_value_heads=8,
            tie_word_embeddings=True,
        ),
        (0.1, 0.2),
        "Llama-3.2-3B-shaped, 28 layers, hidden 3072, intermediate 8192, 24 heads / 8 KV "
        "heads, vocabulary 128256, tied embeddings",
    ),
}


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of this shape."""
    count = 1
    for size in shape:
        count *= size
    return count


def _generator(seed: int, model: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + model * 10_007 + index)


def family_tensors(
    dims: Tuple[int, ...], seed: int, index: int, scales: Sequence[float]
) -> List[torch.Tensor]:
    """Tensor ``index`` of the base and of each fine-tune, bf16; the base is drawn once."""
    if len(dims) == 1:
        base = torch.ones(dims)
    else:
        base = torch.randn(dims, generator=_generator(seed, 0, index)).mul_(INIT_STD)
    out = [base.to(torch.bfloat16)]
    for scale in scales:
        noise = torch.randn(dims, generator=_generator(seed, 1 + int(scale * 1000), index))
        out.append(noise.mul_(scale * INIT_STD).add_(base).to(torch.bfloat16))
        del noise
    return out


def _shards(shape: Shape) -> Iterator[List[Tuple[int, str, Tuple[int, ...]]]]:
    shard: List[Tuple[int, str, Tuple[int, ...]]] = []
    count = 0
    for index, (name, dims) in enumerate(shape.tensors()):
        if shard and count + numel(dims) > shape.shard_parameters:
            yield shard
            shard, count = [], 0
        shard.append((index, name, dims))
        count += numel(dims)
    if shard:
        yield shard


def write_family(paths: Sequence[Path], shape: Shape, seed: int, scales: Sequence[float]) -> None:
    """Stream the base (``paths[0]``) and the fine-tunes shard by shard to their folders.

    Holds one shard of every model at a time, never a whole model.
    """
    from safetensors.torch import save_file

    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    shards = list(_shards(shape))
    weight_map: Dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        per_model: List[Dict[str, torch.Tensor]] = [{} for _ in paths]
        for index, name, dims in shard:
            for tensors, tensor in zip(per_model, family_tensors(dims, seed, index, scales)):
                tensors[name] = tensor
            weight_map[name] = filename
            total += numel(dims) * 2
        for path, tensors in zip(paths, per_model):
            save_file(tensors, str(path / filename), metadata={"format": "pt"})
        del per_model
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for path in paths:
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (path / "config.json").write_text(json.dumps(shape.config(), indent=1))


def family_root(cache: Path, size: str, seed: int = 0) -> Path:
    """The folder that holds the family of ``size``."""
    return cache / f"llama-{size}-seed{seed}"


def build_family(cache: Path, size: str, seed: int = 0) -> List[Path]:
    """``[base, ft0, ...]`` under ``cache``; built once, reused while complete and unchanged."""
    family = FAMILIES[size]
    root = family_root(cache, size, seed)
    marker = root / "complete.json"
    spec = {
        "shape": asdict(family.shape),
        "scales": family.delta_scales,
        "seed": seed,
        "init": INIT_STD,
    }
    names = ["base"] + [f"ft{i}" for i in range(len(family.delta_scales))]
    paths = [root / name for name in names]
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return paths
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    write_family(paths, family.shape, seed, family.delta_scales)
    print(
        f"built {size} family ({len(paths)} checkpoints) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    marker.write_text(json.dumps(spec))
    return paths
