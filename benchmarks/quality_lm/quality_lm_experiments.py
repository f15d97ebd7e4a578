"""The experiments of the language-model quality benchmark, for one run (:class:`Run`).

A run reads the corpora, pre-trains one base (seed 0, shared by every seed;
a base kept by ``--keep`` from the same settings and pool is read back instead,
e.g. to split a long run with ``--first-seed``), and then, per seed, regime and experiment, fine-tunes the experts, saves
them, evaluates them and merges them with every method at every ``lambda``
of the grid. What it measures goes into a :class:`~quality_lm_report.Record`.

* Expert seeds: which files an expert gets depends on the seed and its slot
  only, so an expert sees the same data in both regimes; the order of its
  batches depends on seed, regime and slot.
* Steps: ``epochs`` regime, ``Settings.epochs`` passes over the expert's
  windows (the last batch of a pass may be short); ``steps`` regime, for every
  expert the steps of ``Settings.epochs`` passes over the geometric mean of the
  volumes (the 4x volume of 1:4:16), so the smallest expert makes 4x (1:8:
  2.8x) as many passes as in the ``epochs`` regime and the largest 1/4 as many.
* Lambda: the grid value with the lowest validation loss averaged over the
  experiment's domains (the smaller one on a tie); its test losses are recorded.
* Merged checkpoints are deleted as soon as they are read back; the recipes
  stay in the work directory (for ``--keep``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import quality_lm_data as data
import quality_lm_merges as merges
import quality_lm_train as train
import torch
from quality_lm_compare import NAN_TENSOR, CompareStep, compare_entry
from quality_lm_report import ExpertRecord, MergeCheck, Record

EXPERIMENTS: Tuple[str, ...] = ("three-domain", "one-domain")
REGIMES: Tuple[str, ...] = ("epochs", "steps")
BASE_STAMP = "quality_lm_base.json"
"""Next to the base checkpoint: the settings and pool it was pre-trained from."""
Plan = List[Tuple[str, List[bytes], int]]
"""Per expert: its domain, its training documents and their size in bytes."""


@dataclass
class Corpora:
    """The documents of every corpus and the evaluation windows of each expert domain."""

    pool: data.Documents
    domains: Dict[str, data.Documents]
    val: Dict[str, torch.Tensor]
    test: Dict[str, torch.Tensor]


def read_corpora(settings: train.Settings, record: Record) -> Corpora:
    """The pool and every expert domain at the caps of ``settings`` (described in ``record``)."""
    seen: Set[str] = set()
    pool_caps = {"train": settings.pretrain_bytes, "val": settings.val_bytes}
    pool = data.read_corpus(data.POOL, pool_caps, seen)
    caps = {"train": settings.train_bytes(), "val": settings.val_bytes, "test": settings.test_bytes}
    domains = {c.name: data.read_corpus(c, caps, seen) for c in data.DOMAINS}
    for documents in [pool, *domains.values()]:
        record.corpora[documents.corpus] = {
            "sources": documents.sources_used,
            **{f"{split}_files": len(documents.keys[split]) for split in data.SPLITS},
            **{f"{split}_bytes": documents.size(split) for split in data.SPLITS},
            "keys": documents.keys,
        }

    def rows(split: str) -> Dict[str, torch.Tensor]:
        return {
            name: data.windows(data.encode(d.splits[split]), settings.context)
            for name, d in domains.items()
        }

    return Corpora(pool, domains, rows("val"), rows("test"))


@dataclass
class Expert:
    """One fine-tuned checkpoint and what it was trained on."""

    domain: str
    volume: int
    path: Path
    state: train.State


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


class Run:
    """One benchmark run: corpora, the shared base, the merger and the record."""

    def __init__(
        self,
        settings: train.Settings,
        work: Path,
        pair_domain: str,
        compare: bool = False,
        accuracy: bool = False,
    ) -> None:
        self.settings = settings
        self.compare = CompareStep(settings.context, tasks=accuracy) if compare else None
        """With ``--compare``: ``mergekit-nan compare`` after each three-domain experiment
        (with ``--accuracy``, also on a multiple-choice task per domain)."""
        self.work = work
        self.pair_domain = pair_domain
        self.started = time.perf_counter()
        self.record = Record()
        self.merger = merges.Merger()
        self.corpora = read_corpora(settings, self.record)
        sizes = ", ".join(f"{n} {d.size('train')} B" for n, d in self.corpora.domains.items())
        self.log(f"corpora read (train splits: {sizes})")
        self.base_path = work / "base"
        base = self._pretrain()
        self.base_state = train.state_of(base)
        self.base_val = {d: train.evaluate(base, r) for d, r in self.corpora.val.items()}
        self.base_test = {d: train.evaluate(base, r) for d, r in self.corpora.test.items()}
        self.model = train.new_model(settings, 0)
        """Reused to evaluate every expert and merged checkpoint."""

    def log(self, message: str) -> None:
        """A progress line on stderr, with the seconds since the run started."""
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:6.0f} s] {message}", file=sys.stderr, flush=True)

    def _base_stamp(self) -> Dict[str, object]:
        """What the base depends on: the settings (but the seed count) and the pool's text."""
        digest = hashlib.sha256()
        for document in self.corpora.pool.splits["train"]:
            digest.update(hashlib.sha256(document).digest())
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "seeds"}
        return {"settings": settings, "pool_sha256": digest.hexdigest()}

    def _pretrain(self) -> train.LlamaForCausalLM:
        """The base: read back from ``work/base`` if a kept run made it from the same
        settings and pool (``--keep``), else pre-trained and saved there."""
        context = self.settings.context
        stamp, marker = self._base_stamp(), self.base_path / BASE_STAMP
        begin = time.perf_counter()
        if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
            base = train.new_model(self.settings, 0)
            base.load_state_dict(train.load_state(self.base_path))
            done = f"base read back from {self.base_path}"
        else:
            shutil.rmtree(self.base_path, ignore_errors=True)
            rows = data.windows(data.encode(self.corpora.pool.splits["train"]), context)
            base = train.pretrain(rows, self.settings, seed=0)
            train.save(base, self.base_path)
            marker.write_text(json.dumps(stamp, indent=1))
            done = f"base pre-trained: {self.settings.pretrain_steps} steps"
        held_out = data.windows(data.encode(self.corpora.pool.splits["val"]), context)
        self.pool_loss = train.evaluate(base, held_out)
        self.log(
            f"{done} in {time.perf_counter() - begin:.0f} s; held-out pool loss "
            f"{self.pool_loss:.3f}"
        )
        return base

    def steps(self, volumes: Sequence[int], regime: str) -> List[int]:
        """Optimiser steps of each expert in ``regime``."""
        s = self.settings

        def passes(volume: float) -> int:
            return s.epochs * data.steps_per_epoch(int(volume) // s.context, s.batch_size)

        if regime == "epochs":
            return [passes(v) for v in volumes]
        middle = math.exp(sum(math.log(v) for v in volumes) / len(volumes))
        return [passes(middle)] * len(volumes)

    def _train_experts(self, experiment: str, regime: str, seed: int, plan: Plan) -> List[Expert]:
        """Fine-tune, save, check and describe one expert per entry of ``plan``."""
        counts = self.steps([volume for _, _, volume in plan], regime)
        directory = self.work / f"seed{seed}" / experiment / regime
        experts = []
        for index, ((domain, documents, volume), count) in enumerate(zip(plan, counts)):
            rows = data.windows(data.encode(documents), self.settings.context)
            tune_seed = 1000 * (seed + 1) + 100 * REGIMES.index(regime)
            tune_seed += 10 * EXPERIMENTS.index(experiment) + index
            begin = time.perf_counter()
            path = directory / f"expert{index}-{domain}-{volume}"
            if self.settings.lora_rank:
                lora = train.finetune_lora(self.base_state, rows, count, self.settings, tune_seed)
                lora.save_pretrained(str(path))  # the expert is the adapter
                model = lora.merge_and_unload()
            else:
                model = train.finetune(self.base_state, rows, count, self.settings, tune_seed)
                train.save(model, path)
            seconds = time.perf_counter() - begin
            own_val = train.evaluate(model, self.corpora.val[domain])
            gain = self.base_val[domain] - own_val
            epochs = count * self.settings.batch_size / rows.shape[0]
            self.log(
                f"seed {seed} {experiment} {regime}: expert {index} {domain} {volume} B, "
                f"{count} steps ({epochs:.1f} epochs) in {seconds:.0f} s; validation gain "
                f"over the base {gain:.3f} nats/byte"
            )
            minimum = self.settings.min_gain
            if minimum is not None and gain < minimum:
                failure = (
                    f"expert {domain} ({volume} B, {experiment}, {regime}, seed {seed}) beats the "
                    f"base on its own domain by only {gain:.3f} nats/byte (validation), "
                    f"less than {minimum}"
                )
                self.record.failures.append(failure)
                self.log(f"WARNING: {failure}")
            experts.append(Expert(domain, volume, path, train.state_of(model)))
            self.record.experts.append(
                ExpertRecord(
                    experiment=experiment,
                    regime=regime,
                    seed=seed,
                    index=index,
                    domain=domain,
                    volume=volume,
                    steps=count,
                    epochs=epochs,
                    train_s=seconds,
                    own_val=own_val,
                    base_own_val=self.base_val[domain],
                    own_loss=train.evaluate(model, self.corpora.test[domain]),
                    base_own_loss=self.base_test[domain],
                )
            )
        self._describe(experts)
        return experts

    def _describe(self, experts: Sequence[Expert]) -> None:
        """Norms and NAN coefficients of the experts just trained (the last records)."""
        states = [e.state for e in experts]
        norms = merges.model_norms(self.base_state, states)
        p1, p2 = merges.alphas(norms, 1.0), merges.alphas(norms, 2.0)
        tensor = merges.mean_tensor_alphas(self.base_state, states, 1.0)
        total = sum(e.volume for e in experts)
        for i, entry in enumerate(self.record.experts[-len(experts) :]):
            entry.norm, entry.alpha_model_p1, entry.alpha_model_p2 = norms[i], p1[i], p2[i]
            entry.alpha_tensor_p1 = tensor[i]
            entry.oracle_weight = experts[i].volume / total

    def _test(self, key: Tuple[str, str, str], seed: int, domains: Sequence[str]) -> None:
        """Test losses of ``self.model`` (as loaded) on ``domains``, recorded under ``key``."""
        for domain in domains:
            loss = train.evaluate(self.model, self.corpora.test[domain])
            self.record.add_loss(key, domain, seed, loss)

    def _merge(
        self, key: Tuple[str, str, str], seed: int, method: merges.Method, experts: Sequence[Expert]
    ) -> Tuple[float, float, train.State]:
        """Every ``lambda`` of the grid: (validation loss, lambda, merged weights) of the best."""
        experiment, regime, _ = key
        domains = [self.pair_domain] if experiment == "one-domain" else list(self.corpora.val)
        volumes = [e.volume for e in experts]
        states = [e.state for e in experts]
        job = self.work / f"seed{seed}" / experiment / regime / "merges"
        best: Optional[Tuple[float, float, train.State]] = None
        for lam in merges.lambda_grid(self.settings.lambdas):
            paths = [e.path for e in experts]
            config = merges.recipe(
                method, self.base_path, paths, volumes, lam, self.settings.density
            )
            lora = bool(self.settings.lora_rank)
            out = self.merger.merge(
                method, config, job / f"{_slug(method.label)}-lambda{lam:g}", seed, lora
            )
            state = self._folded(out) if lora else train.load_state(out)
            shutil.rmtree(out)
            if method.linear:
                expected = merges.expected_linear(method, self.base_state, states, volumes, lam)
                deviation = merges.deviation(state, expected, self.base_state)
                self.record.checks.append(
                    MergeCheck(experiment, regime, seed, method.label, lam, deviation)
                )
            self.model.load_state_dict(state)
            val = {d: train.evaluate(self.model, self.corpora.val[d]) for d in domains}
            mean = sum(val.values()) / len(val)
            self.record.validation.append(
                {"key": list(key), "seed": seed, "lambda": lam, "val": val, "mean": mean}
            )
            if best is None or mean < best[0]:
                best = (mean, lam, state)
        assert best is not None, "empty lambda grid"
        return best

    def _folded(self, adapter: Path) -> train.State:
        """The base with a merged LoRA adapter folded in by PEFT."""
        from peft import PeftModel

        model = train.new_model(self.settings, 0)
        model.load_state_dict(self.base_state)
        return train.state_of(PeftModel.from_pretrained(model, str(adapter)).merge_and_unload())

    def experiment(
        self,
        experiment: str,
        regime: str,
        seed: int,
        plan: Plan,
        domains: Sequence[str],
        methods: Sequence[merges.Method],
    ) -> None:
        """Base, every expert alone and every merge of one experiment, regime and seed."""
        for domain in domains:
            self.record.add_loss((experiment, regime, "base"), domain, seed, self.base_test[domain])
        experts = self._train_experts(experiment, regime, seed, plan)
        for expert in experts:
            if experiment == "three-domain":
                label = f"expert {expert.domain} alone"
            else:
                label = f"expert {expert.volume // self.settings.pair_unit_bytes}x alone"
            self.model.load_state_dict(expert.state)
            self._test((experiment, regime, label), seed, domains)
        if experiment == "three-domain":
            for expert in experts:
                alone = (experiment, regime, f"expert {expert.domain} alone", expert.domain)
                own = (experiment, regime, "own expert (no merge)")
                self.record.add_loss(own, expert.domain, seed, self.record.losses[alone][seed])
        for method in methods:
            self.record.references.setdefault(method.label, method.reference)
            key = (experiment, regime, method.label)
            val, lam, state = self._merge(key, seed, method, experts)
            self.record.lambdas.setdefault(key, {})[seed] = lam
            self.model.load_state_dict(state)
            self._test(key, seed, domains)
            self.log(
                f"seed {seed} {experiment} {regime}: {method.label}: lambda {lam:g}, "
                f"validation {val:.4f}"
            )
        if self.compare is not None and experiment == "three-domain":
            self._compare(regime, seed, experts, domains)

    def _compare(
        self, regime: str, seed: int, experts: Sequence[Expert], domains: Sequence[str]
    ) -> None:
        """``mergekit-nan compare`` on the experts: nan (tensor, p=1) at its chosen lambda."""
        lam = self.record.lambdas[("three-domain", regime, NAN_TENSOR)][seed]
        begin = time.perf_counter()
        found = self.compare.run(
            self.work / f"seed{seed}" / "three-domain" / regime / "compare",
            self.base_path,
            [e.path for e in experts],
            {d: self.corpora.domains[d].splits["test"] for d in domains},
            lam,
            seed,
        )
        entry = compare_entry(found, regime, seed, lam, list(domains))
        entry["seconds"] = time.perf_counter() - begin
        self.record.compare.append(entry)
        for line in entry["verdicts"]:
            self.log(f"seed {seed} three-domain {regime}: compare: {line}")

    def three_domain(self, regime: str, seed: int) -> None:
        """One expert per domain; the volumes 1:4:16 rotate across the domains with the seed."""
        s, names = self.settings, list(self.corpora.domains)
        plan: Plan = []
        for slot, name in enumerate(names):
            volume = s.unit_bytes * s.ratios[(slot + seed) % len(s.ratios)]
            documents = data.shuffled(self.corpora.domains[name].splits["train"], 100 * seed + slot)
            plan.append((name, data.take_bytes(documents, 0, volume), volume))
        methods = merges.three_domain_methods()
        if s.lora_rank:
            methods = merges.adapter_methods(methods)
        self.experiment("three-domain", regime, seed, plan, names, methods)

    def one_domain(self, regime: str, seed: int) -> None:
        """Two models on disjoint 1:8 subsets of ``pair_domain`` (the paper's first experiment)."""
        s, name = self.settings, self.pair_domain
        documents = data.shuffled(self.corpora.domains[name].splits["train"], 100 * seed + 50)
        plan: Plan = []
        start = 0
        for ratio in s.pair_ratios:
            volume = s.pair_unit_bytes * ratio
            plan.append((name, data.take_bytes(documents, start, volume), volume))
            start += volume
        methods = merges.one_domain_methods()
        if s.lora_rank:
            methods = merges.adapter_methods(methods)
        self.experiment("one-domain", regime, seed, plan, [name], methods)
