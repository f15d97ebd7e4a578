"""The by-hand side of the compare cost benchmark: a plain transformers loop over merged models.

What a user writes without ``mergekit-nan compare``: load each merged model, score
every document of a ``.txt`` file (one per line) one at a time, print nats per
token (tokens 2..n of ``tokenizer(text)``, cut to ``--max-length``).

Run: ``python benchmarks/compare/by_hand_eval.py --data FILE --tokenizer DIR MODEL...``
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.data, encoding="utf-8") as file:
        documents = [tokenizer(line.rstrip("\n"))["input_ids"][: args.max_length] for line in file]
    documents = [ids for ids in documents if len(ids) >= 2]
    results = {}
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for ids in documents:
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
                log_probs = torch.log_softmax(logits, dim=-1)
                total -= float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
                count += len(ids) - 1
        results[path] = total / count
        del model
    print(json.dumps(results))


if __name__ == "__main__":
    main()
