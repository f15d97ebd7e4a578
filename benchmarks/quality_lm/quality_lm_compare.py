"""The language-model benchmark's ``mergekit-nan compare`` step (``quality_lm.py --compare``).

After the merges of a three-domain experiment, the user's question is asked the
user's way: ``mergekit-nan compare`` on the experts, with the test split of
each domain as one held-out file, on the ``nan`` recipe (tensor granularity,
``nan_exponent`` 1, the ``lambda`` the benchmark chose for it on the
validation split) with ``--exponent -1``. Its baseline is uniform task
arithmetic at that same ``lambda``. Its verdicts can then be set beside the
benchmark's own tables (``nan (tensor, p=1)`` against uniform task arithmetic).

The checkpoints are byte-level and carry no tokenizer; this step saves one in
the base and in each expert: a ``tokenizers`` BPE without merges over the 256
characters U+0000..U+00FF, so that text written as the Latin-1 decoding of the
bytes tokenizes to exactly the byte values the models were trained on (the
document separator, token 256, is its end-of-text token, which lm-eval needs; the
held-out text never holds it). Each test document is cut into
pieces of the models' context (``--max-length`` is the context), each piece one
held-out document, close to the benchmark's non-overlapping windows: compare
predicts bytes 2..n of each piece (nats per token are nats per byte here), the
benchmark every byte of a window.

With ``tasks`` (``quality_lm.py --compare --accuracy``) compare also scores one
lm-eval multiple-choice task per domain, built from the same test split
(:func:`choice_task`): which of four continuations follows a context? The
true next bytes against three taken from other documents of the same domain;
accuracy, the task's metric, gets the same paired intervals and pick.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List, Sequence

import yaml
from quality_lm_merges import UNIFORM

__all__ = [
    "NAN_TENSOR",
    "CompareStep",
    "byte_tokenizer",
    "accuracy_table",
    "choice_task",
    "compare_entry",
    "compare_table",
]

CONTINUATION = 16
"""Bytes of each choice of the accuracy tasks; the context is the model's context minus these."""

NAN_TENSOR = "nan (tensor, p=1)"
"""The benchmark's row whose recipe (at its chosen ``lambda``) compare is given."""


SEPARATOR = "<|separator|>"
"""The document separator's token (id 256): lm-eval needs an end-of-text token."""


def byte_tokenizer():
    """A fast tokenizer whose ids are the code points U+0000..U+00FF, one per character, and
    the document separator (256) as its end-of-text token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {chr(value): value for value in range(256)}
    tokenizer = Tokenizer(models.BPE(vocabulary, merges=[]))
    tokenizer.add_special_tokens([SEPARATOR])  # id 256, the document separator
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=SEPARATOR)


def held_out_file(path: Path, documents: Sequence[bytes], context: int) -> int:
    """Write ``documents`` cut into ``context``-byte pieces as ``.jsonl``; returns the pieces."""
    pieces = 0
    with open(path, "w", encoding="utf-8") as file:
        for document in documents:
            for start in range(0, len(document), context):
                text = document[start : start + context].decode("latin-1")
                file.write(json.dumps({"text": text}) + "\n")
                pieces += 1
    return pieces


def choice_task(
    folder: Path, domain: str, documents: Sequence[bytes], context: int, seed: int
) -> str:
    """An lm-eval multiple-choice task YAML (and its ``.jsonl``) for one domain; its name.

    Each ``context``-byte window of a test document is one question: its first
    ``context - CONTINUATION`` bytes the context, its last ``CONTINUATION`` the
    true continuation; the three distractors are the same bytes of three windows
    of other documents of the domain, drawn with ``seed`` (other windows of any
    document where the split has too few other documents). Text is the Latin-1
    decoding of the bytes (the byte tokenizer's ids), choices follow the context
    directly. A distractor never equals the true continuation.
    """
    rng = random.Random(f"{domain}-{seed}")
    windows = [
        (number, document[start : start + context])
        for number, document in enumerate(documents)
        for start in range(0, len(document) - context + 1, context)
    ]
    prefix = context - CONTINUATION
    name = "qlm_" + domain.replace("-", "_")
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as file:
        for number, window in windows:
            true = window[prefix:]
            unlike = [i for i, (_, w) in enumerate(windows) if w[prefix:] != true]
            elsewhere = [i for i in unlike if windows[i][0] != number]
            if len(elsewhere) < 3:  # a test split of one or two documents (tiny sizes)
                elsewhere = unlike
            if len(elsewhere) < 3:
                raise ValueError(f"{domain}: fewer than four test windows for its questions")
            others = rng.sample(elsewhere, 3)
            choices = [windows[i][1][prefix:] for i in others]
            gold = rng.randrange(4)
            choices.insert(gold, true)
            record = {"context": window[:prefix].decode("latin-1"),
                      "choices": [c.decode("latin-1") for c in choices], "gold": gold}  # fmt: skip
            file.write(json.dumps(record) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
        f"  data_files:\n    test: {folder / f'{name}.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return name


@dataclass
class CompareStep:
    """Runs ``mergekit-nan compare`` through its installed entry point, in this process."""

    context: int
    resamples: int = 1000
    tasks: bool = False

    def __post_init__(self) -> None:
        (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mergekit-nan"]
        self._main = script.load()

    def run(
        self,
        work: Path,
        base: Path,
        experts: Sequence[Path],
        test: Dict[str, Sequence[bytes]],
        lam: float,
        seed: int,
    ) -> Dict[str, object]:
        """compare's JSON for the ``nan`` recipe at ``lam`` over ``experts``, on ``test``."""
        from mergekit.io.tasks import LoaderCache

        work.mkdir(parents=True, exist_ok=True)
        tokenizer = byte_tokenizer()
        for model in (base, *experts):
            if not (Path(model) / "tokenizer.json").exists():
                tokenizer.save_pretrained(str(model))
        recipe = {
            "merge_method": "nan",
            "base_model": str(Path(base).resolve()),
            "models": [{"model": str(Path(p).resolve())} for p in experts],
            "parameters": {"lambda": float(lam)},
            "dtype": "float32",
        }
        path = work / "nan.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        arguments: List[str] = ["compare", str(path)]
        for domain, documents in test.items():
            held_out_file(work / f"{domain}.jsonl", documents, self.context)
            arguments += ["--data", str(work / f"{domain}.jsonl")]
            if self.tasks:
                (work / "tasks").mkdir(exist_ok=True)
                choice_task(work / "tasks", domain, documents, self.context, seed)
                arguments += [
                    "--task",
                    str(work / "tasks" / f"qlm_{domain.replace('-', '_')}.yaml"),
                ]
        arguments += ["--exponent", "-1", "--max-length", str(self.context), "--seed", str(seed),
                      "--bootstrap", str(self.resamples), "--json", str(work / "compare.json"),
                      "--work-dir", str(work), "--quiet"]  # fmt: skip
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                self._main(arguments, standalone_mode=False)
        except Exception as error:
            raise RuntimeError(f"mergekit-nan compare failed on {path}: {error}") from error
        finally:
            LoaderCache().flush_all()
            LoaderCache().loaders.clear()
        found = json.loads((work / "compare.json").read_text())
        found["printed"] = output.getvalue()
        return found


def _difference(entry: Dict[str, object]) -> Dict[str, float]:
    low, high = entry["ci95"]
    return {"diff": entry["diff"], "low": low, "high": high}


def compare_entry(
    found: Dict[str, object], regime: str, seed: int, lam: float, domains: List[str]
) -> Dict[str, object]:
    """What the record keeps of one compare run: differences per domain and overall, verdicts."""
    by_label = {c["label"]: c for c in found["candidates"]}
    names = {Path(name).stem: name for name in by_label["nan"]["files"]}
    entry: Dict[str, object] = {"regime": regime, "seed": seed, "lambda": lam}
    for label, key in (("nan", "nan"), ("nan exponent=-1", "exponent_minus_1")):
        candidate = by_label[label]
        entry[key] = {
            **{d: _difference(candidate["vs_baseline"][names[d]]) for d in domains},
            "overall": _difference(candidate["vs_baseline_overall"]),
        }
    if "tasks" in found:
        for label, key in (("nan", "nan"), ("nan exponent=-1", "exponent_minus_1")):
            entry[f"{key}_accuracy"] = {
                name: _difference(value)
                for name, value in by_label[label]["vs_baseline_tasks"].items()
            }
        entry["accuracy"] = {
            label: {name: c["tasks"][name]["value"] for name in c["tasks"]}
            for label, c in by_label.items()
        }
    entry["pick"] = found["pick"]["label"]
    entry["regime_line"] = found["regime"]
    lines = str(found["printed"]).splitlines()
    ends = [i for i, line in enumerate(lines) if line.startswith("(") and "bootstrap" in line]
    after = lines[ends[-1] + 1 :] if ends else []
    entry["verdicts"] = [line for line in after if line and not line.startswith("Wrote")]
    return entry


def _cell(value: Dict[str, float]) -> str:
    return f"{value['diff']:+.4f} [{value['low']:+.4f}, {value['high']:+.4f}]"


def compare_table(record) -> List[str]:
    """Per regime and seed: compare's differences beside the benchmark's own (Markdown)."""
    lines = [
        "compare: `mergekit-nan compare` on the nan (tensor, p=1) recipe at its chosen lambda, "
        "`--exponent -1`, the test split of each domain as a file (nats/byte over bytes 2..n "
        "of each context-sized piece; baseline: uniform task arithmetic at the same lambda; "
        "95% paired bootstrap intervals over pieces, pooled over domains). benchmark: the "
        f"tables' {NAN_TENSOR} minus {UNIFORM} (test split, mean over domains, each at its own "
        "lambda). Negative = better than uniform.",
        "",
        "| regime | seed | lambda | compare: nan - uniform | compare: p=-1 - uniform "
        "| benchmark: nan - uniform | compare's pick | compare's reading of the regime |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in record.compare:
        regime, seed = entry["regime"], entry["seed"]
        nan = record.mean_loss(("three-domain", regime, NAN_TENSOR)).get(seed)
        uniform = record.mean_loss(("three-domain", regime, UNIFORM)).get(seed)
        own = f"{nan - uniform:+.4f}" if nan is not None and uniform is not None else "-"
        reading = str(entry.get("regime_line") or "").split(":")[0]
        lines.append(
            f"| {regime} | {seed} | {entry['lambda']:g} | {_cell(entry['nan']['overall'])} "
            f"| {_cell(entry['exponent_minus_1']['overall'])} | {own} | {entry['pick']} "
            f"| {reading} |"
        )
    return lines


def accuracy_table(record) -> List[str]:
    """Per regime, seed and domain: compare's accuracy differences from uniform (Markdown)."""
    entries = [e for e in record.compare if "nan_accuracy" in e]
    if not entries:
        return []
    lines = [
        "accuracy: the same compare runs on one multiple-choice task per domain (which of four "
        f"{CONTINUATION}-byte continuations follows the context: the true one or three from "
        "other test documents of the domain); accuracy minus uniform's, 95% paired bootstrap "
        "intervals over questions. Positive = better than uniform.",
        "",
        "| regime | seed | task | uniform's accuracy | nan - uniform | p=-1 - uniform |",
        "|---|---|---|---|---|---|",
    ]
    for entry in entries:
        for task, nan in entry["nan_accuracy"].items():
            uniform = entry["accuracy"]["uniform"][task]
            minus = entry["exponent_minus_1_accuracy"][task]
            lines.append(
                f"| {entry['regime']} | {entry['seed']} | {task} | {uniform:.3f} | {_cell(nan)} "
                f"| {_cell(minus)} |"
            )
    return lines
