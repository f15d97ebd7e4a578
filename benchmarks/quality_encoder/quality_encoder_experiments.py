"""The experiment of the encoder benchmark: probes, experts, merges, lambda, scores.

For each seed, every task gets a training volume from the ladder ``unit x (1, 4, 16, 4)``
rotated by the seed, and a seed-shuffled subset of its training split of that size. The
linear probe of each task is trained on it once (the baseline); then, in each regime, one
expert per task (backbone and head) is fine-tuned and the four backbones are merged by every
method of :data:`METHODS`. Each method's ``lambda`` is chosen on the validation split (mean
accuracy over the tasks, each with its expert's head) and the test split is scored at that
``lambda``.

Regimes: ``epochs``: every expert makes ``Settings.epochs`` passes over its data, so steps
grow with the volume; ``steps``: every expert makes the steps of the 4-unit expert of the
``epochs`` regime (the geometric mean of the ladder), as the standard vision checkpoints
were all trained for the same number of steps, so the 1-unit expert makes four times as many
passes and the 16-unit one a quarter.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import quality_encoder_merges as merges
import quality_encoder_methods as methods
import torch
from quality_encoder_data import Example, Pool
from quality_encoder_model import FROZEN, Encoder, Head

REGIMES = ("epochs", "steps")
LADDER = (1, 4, 16, 4)
GEOMETRIC_MEAN = 4

TA, NAN_T, NAN_L, NAN_M = "task arithmetic", "nan (tensor)", "nan (layer)", "nan (model)"
MMCR, ORACLE, TIES, TIES_NAN = "MMCR (full-weight norm)", "oracle (data volume)", "ties", "ties+nan"
ISO, TSV, ISO_NAN = "Iso-C", "TSV-M", "Iso-C on nan sum"
METHODS = (TA, NAN_T, NAN_L, NAN_M, MMCR, ORACLE, TIES, TIES_NAN, ISO, TSV, ISO_NAN)
REFERENCE = {NAN_T: TA, NAN_L: TA, NAN_M: TA, MMCR: TA, TIES_NAN: TIES, ISO_NAN: ISO}
"""Each NAN variant and the baseline it is paired with (same seed, same experts)."""
NAN_VARIANTS = (NAN_T, NAN_L, NAN_M, MMCR, TIES_NAN, ISO_NAN)
MERGEKIT = (TA, NAN_T, NAN_L, NAN_M, MMCR, ORACLE, TIES, TIES_NAN)
"""Merged by ``mergekit-pytorch``; the others in plain torch (``quality_encoder_methods``)."""


@dataclass(frozen=True)
class Settings:
    length: int
    """Tokens per example, [CLS] and [SEP] included."""
    windows: int
    """Windows cut from each file at most."""
    files_per_class: int
    unit: int
    """Training examples of the smallest expert."""
    batch: int
    epochs: float
    lr: float
    validation: int
    """Validation examples per task (lambda is chosen on them)."""
    test: int
    """Test examples per task."""
    lambdas: Tuple[float, ...]
    """The coarse grid of lambda; the two geometric midpoints around its best are tried next
    when ``refine``."""
    refine: bool
    density: float
    seeds: int
    layers: int = 0
    """Transformer layers of the backbone kept (0: all six); the tiny size keeps one, to check
    the pipeline in seconds."""


SIZES = {
    "tiny": Settings(16, 2, 40, 2, 4, 1.0, 1e-4, 4, 6, (1.0, 2.0), False, 0.2, 1, layers=1),
    "small": Settings(48, 6, 150, 8, 16, 8.0, 1e-4, 24, 48, (0.5, 1.0, 2.0, 4.0), False, 0.2, 1),
    "full": Settings(
        48, 6, 150, 32, 16, 8.0, 1e-4, 48, 160, (0.5, 1.0, 2.0, 4.0, 8.0), True, 0.2, 3
    ),
}


def volumes(settings: Settings, seed: int, tasks: int) -> List[int]:
    return [settings.unit * LADDER[(t + seed) % len(LADDER)] for t in range(tasks)]


def steps_of(settings: Settings, regime: str, volume: int) -> int:
    seen = volume if regime == "epochs" else settings.unit * GEOMETRIC_MEAN
    return max(1, math.ceil(settings.epochs * seen / settings.batch))


@dataclass
class Record:
    """Every number of a run, keyed by (regime, seed)."""

    accuracy: Dict[Tuple[str, int, str, str, str], float] = field(default_factory=dict)
    """(regime, seed, model, task, split) -> accuracy; model is a method, ``expert`` or
    ``probe``."""
    lam: Dict[Tuple[str, int, str], float] = field(default_factory=dict)
    curve: Dict[Tuple[str, int, str], List[Tuple[float, float]]] = field(default_factory=dict)
    seconds: Dict[Tuple[str, int, str], float] = field(default_factory=dict)
    """Time to build the merged task vector (merge or SVDs), without scoring."""
    norms: Dict[Tuple[str, int, str], Tuple[int, float, int]] = field(default_factory=dict)
    """(regime, seed, task) -> (volume, ||x|| of the expert, steps)."""
    deviation: Dict[Tuple[str, int, str], float] = field(default_factory=dict)
    train_seconds: Dict[Tuple[str, int], float] = field(default_factory=dict)


class Run:
    def __init__(self, settings: Settings, pools: Sequence[Pool], work: Path) -> None:
        self.settings = settings
        self.pools = list(pools)
        self.work = work
        self.encoder = Encoder(layers=settings.layers)
        self.merger = merges.Merger()
        self.record = Record()
        self.base_path = merges.save(self.encoder.base, work / "base.safetensors", FROZEN)
        self.validation = [p.splits["validation"][: settings.validation] for p in self.pools]
        self.test = [p.splits["test"][: settings.test] for p in self.pools]

    def _score(self, heads: Sequence[Head], split: Sequence[Sequence[Example]]) -> List[float]:
        return [self.encoder.accuracy(h, examples) for h, examples in zip(heads, split)]

    def seed(self, seed: int, regimes: Sequence[str]) -> None:
        s, record = self.settings, self.record
        vols = volumes(s, seed, len(self.pools))
        generator = torch.Generator().manual_seed(1000 + seed)
        trains, heads = [], []
        for pool, volume in zip(self.pools, vols):
            order = torch.randperm(len(pool.splits["train"]), generator=generator).tolist()
            train = [pool.splits["train"][i] for i in order[:volume]]
            trains.append(train)
            heads.append(self.encoder.probe(train, len(pool.task.classes)))
        self.encoder.load(self.encoder.base)
        probe = self._score(heads, self.test)
        for regime in regimes:
            for pool, value in zip(self.pools, probe):
                record.accuracy[(regime, seed, "probe", pool.task.name, "test")] = value
            self._regime(regime, seed, vols, trains)

    def _regime(self, regime: str, seed: int, vols, trains) -> None:
        s, record, encoder = self.settings, self.record, self.encoder
        folder = self.work / f"seed{seed}-{regime}"
        paths, states = [], []
        started = time.perf_counter()
        heads = []
        for index, (pool, train) in enumerate(zip(self.pools, trains)):
            steps = steps_of(s, regime, vols[index])
            classes = len(pool.task.classes)
            state, head = encoder.fine_tune(
                classes, train, steps, s.batch, s.lr, 100 * seed + index
            )
            states.append(state)
            heads.append(head)
            paths.append(merges.save(state, folder / f"{pool.task.name}.safetensors", FROZEN))
            encoder.load(state)
            name = pool.task.name
            record.accuracy[(regime, seed, "expert", name, "test")] = encoder.accuracy(
                head, self.test[index]
            )
            norm = sum(
                float((state[n].double() - encoder.base[n].double()).pow(2).sum())
                for n in state
                if state[n].is_floating_point()
            )
            record.norms[(regime, seed, name)] = (vols[index], math.sqrt(norm), steps)
        record.train_seconds[(regime, seed)] = time.perf_counter() - started
        vectors = methods.task_vectors(encoder.base, states, FROZEN)
        for label, build in self._builders(vectors, states, vols, paths, folder, seed).items():
            started = time.perf_counter()
            vector, expected = build()
            record.seconds[(regime, seed, label)] = time.perf_counter() - started
            if expected is not None:
                record.deviation[(regime, seed, label)] = merges.deviation(
                    vector, expected, self.encoder.base
                )
            self._choose_and_test(regime, seed, label, vector, heads)
        shutil.rmtree(folder)

    def _builders(self, vectors, states, vols, paths, folder, seed) -> Dict[str, Callable]:
        s, n = self.settings, len(vectors)
        uniform = [1.0 / n] * n
        oracle = [v / sum(vols) for v in vols]
        mmcr = methods.mmcr_weights(states)

        def stock(recipe: merges.Recipe, expected=None):
            def build():
                merged = self.merger.merge(recipe, self.base_path, paths, folder, seed)
                return merged, (expected() if expected else None)

            return build

        def pooled(granularity: str):
            groups = methods.pooled_weights(vectors, granularity)
            weights = [merges.conditional(groups, i) for i in range(n)]

            def expected():
                return {
                    name: sum(
                        groups[methods.group_of(name, granularity)][i] * v[name]
                        for i, v in enumerate(vectors)
                    )
                    for name in vectors[0]
                }

            return stock(merges.Recipe("task_arithmetic", weights), expected)

        def nan_expected():
            weights = methods.nan_tensor_weights(vectors)
            return {
                name: sum(w[name] * v[name] for w, v in zip(weights, vectors))
                for name in vectors[0]
            }

        def torch_only(function):
            return lambda: (function(), None)

        return {
            TA: stock(
                merges.Recipe("task_arithmetic", uniform), lambda: methods.linear(vectors, uniform)
            ),
            NAN_T: stock(merges.Recipe("nan"), nan_expected),
            NAN_L: pooled("layer"),
            NAN_M: pooled("model"),
            MMCR: stock(
                merges.Recipe("task_arithmetic", mmcr), lambda: methods.linear(vectors, mmcr)
            ),
            ORACLE: stock(
                merges.Recipe("task_arithmetic", oracle), lambda: methods.linear(vectors, oracle)
            ),
            TIES: stock(merges.Recipe("ties", uniform, s.density)),
            TIES_NAN: stock(merges.Recipe("ties+nan", None, s.density)),
            ISO: torch_only(lambda: methods.iso_c(vectors)),
            TSV: torch_only(lambda: methods.tsv_m(vectors)),
            ISO_NAN: torch_only(
                lambda: methods.iso_c(vectors, methods.nan_tensor_weights(vectors))
            ),
        }

    def _choose_and_test(self, regime, seed, label, vector, heads) -> None:
        s, encoder = self.settings, self.encoder
        scores: Dict[float, float] = {}

        def score(lam: float) -> float:
            if lam not in scores:
                encoder.load(methods.apply(encoder.base, vector, lam))
                values = self._score(heads, self.validation)
                scores[lam] = sum(values) / len(values)
            return scores[lam]

        for lam in s.lambdas:
            score(lam)
        if s.refine:
            best = max(scores, key=lambda k: (scores[k], -k))
            for factor in (2**-0.5, 2**0.5):
                score(round(best * factor, 4))
        best = max(scores, key=lambda k: (scores[k], -k))
        self.record.lam[(regime, seed, label)] = best
        self.record.curve[(regime, seed, label)] = sorted(scores.items())
        encoder.load(methods.apply(encoder.base, vector, best))
        for pool, value in zip(self.pools, self._score(heads, self.test)):
            self.record.accuracy[(regime, seed, label, pool.task.name, "test")] = value
