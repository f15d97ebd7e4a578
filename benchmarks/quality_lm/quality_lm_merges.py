"""The merges of the language-model quality benchmark: recipes, in-process mergekit runs, checks.

Every merge is a YAML recipe over SAVED checkpoints (absolute paths, ``dtype:
float32``), run in this process through the installed console scripts' click
entry points, looked up by name in ``importlib.metadata`` (``mergekit-yaml``
and ``mergekit-nan``), as ``main(args, standalone_mode=False)`` with
``--no-copy-tokenizer --no-write-model-card --quiet --random-seed SEED``.
Tensor granularity runs on the stock ``mergekit-yaml``; ``nan_granularity:
layer|model`` runs on ``mergekit-nan merge RECIPE OUT --granularity ...``.
mergekit caches model loaders per path in a process-wide singleton, so the
cache is flushed and emptied after every merge.

Weight convention (every method at the same total scale): the per-model
weights sum to 1 and the top-level ``lambda`` scales the merged task vector,
result = base + lambda * sum_i w_i (theta_i - base):

* ``task arithmetic (uniform)``: w_i = 1/n; ``oracle``: w_i = volume_i / sum of volumes;
* ``nan``: w_i = alpha_i ~ ||x_i||^-p (normalised), x_i = theta_i - base
  (``nan_norm: weights``: x_i = theta_i), per tensor, layer or whole model;
* ``ties``/``dare_ties``: w_i = 1/n, density :attr:`Settings.density`
  (``ties`` normalises by the weights of the agreeing signs itself);
  ``ties+nan``/``dare_ties+nan``: no weights given, so NAN's coefficients sum to 1.

:func:`expected_linear` recomputes the linear merges (task arithmetic, oracle,
``nan`` at every granularity) in float64 from the checkpoints, and
:func:`deviation` compares mergekit's output with it: a check of the plugin.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

State = Dict[str, torch.Tensor]
GRANULARITIES = ("tensor", "layer", "model")
UNIFORM = "task arithmetic (uniform)"


@dataclass(frozen=True)
class Method:
    """One merge: a mergekit method, its parameters and how its weights are set."""

    label: str
    merge_method: str
    weights: str = "none"
    """``uniform`` (1/n), ``oracle`` (proportional to data volume) or ``none``."""
    granularity: str = "tensor"
    parameters: Mapping[str, object] = field(default_factory=dict)
    """Top-level parameters besides ``lambda`` (and ``nan_granularity``)."""
    sparse: bool = False
    """Takes ``density`` per model (ties, dare_ties and their +nan versions)."""
    reference: Optional[str] = None
    """The stock method a ``+nan`` method is compared with, paired by seed (every merge is
    also compared with uniform task arithmetic)."""

    @property
    def tool(self) -> str:
        return "mergekit-yaml" if self.granularity == "tensor" else "mergekit-nan merge"

    @property
    def linear(self) -> bool:
        """Whether :func:`expected_linear` can recompute it."""
        return self.merge_method in ("task_arithmetic", "nan")


def _nan(granularity: str, exponent: float, **extra: object) -> Method:
    label = f"nan ({granularity}, p={exponent:g})"
    if extra:
        label = "nan (" + ", ".join(f"{k}: {v}" for k, v in extra.items()) + ")"
    return Method(
        label, "nan", granularity=granularity, parameters={"nan_exponent": exponent, **extra}
    )


def three_domain_methods() -> List[Method]:
    """The merges of the three-domain experiment."""
    methods = [
        Method(UNIFORM, "task_arithmetic", "uniform"),
        Method("oracle (weight ~ data volume)", "task_arithmetic", "oracle"),
    ]
    methods += [_nan(g, p) for g in GRANULARITIES for p in (1.0, 2.0)]
    methods.append(_nan("tensor", 1.0, nan_norm="weights"))
    methods += [
        Method("ties (uniform)", "ties", "uniform", sparse=True),
        Method("ties+nan", "ties+nan", sparse=True, reference="ties (uniform)"),
        Method("dare_ties (uniform)", "dare_ties", "uniform", sparse=True),
        Method("dare_ties+nan", "dare_ties+nan", sparse=True, reference="dare_ties (uniform)"),
    ]
    return methods


def adapter_methods(methods: Sequence[Method]) -> List[Method]:
    """The merges an adapter recipe can give as one LoRA adapter: the linear ones
    (task arithmetic, oracle, ``nan`` on task vectors); ``ties``, ``dare_ties`` and
    ``nan_norm: weights`` are refused for adapters."""
    return [m for m in methods if m.linear and "nan_norm" not in m.parameters]


def one_domain_methods() -> List[Method]:
    """The merges of the one-domain experiment (the paper's first experiment)."""
    return [
        Method(UNIFORM, "task_arithmetic", "uniform"),
        Method("oracle (weight ~ data volume)", "task_arithmetic", "oracle"),
        _nan("tensor", 1.0),
        _nan("tensor", 2.0),
        _nan("model", 1.0),
    ]


def weights_of(method: Method, volumes: Sequence[int]) -> Optional[List[float]]:
    """The per-model ``weight`` values of ``method`` (None: the recipe gives none)."""
    if method.weights == "uniform":
        return [1.0 / len(volumes)] * len(volumes)
    if method.weights == "oracle":
        return [v / sum(volumes) for v in volumes]
    return None


def recipe(
    method: Method,
    base: Path,
    experts: Sequence[Path],
    volumes: Sequence[int],
    lam: float,
    density: float,
) -> Dict[str, object]:
    """The mergekit recipe (a YAML-ready dict) of ``method`` at ``lambda = lam``."""
    parameters: Dict[str, object] = {"lambda": float(lam), **method.parameters}
    if method.granularity != "tensor":
        parameters["nan_granularity"] = method.granularity
    weights = weights_of(method, volumes)
    models = []
    for index, path in enumerate(experts):
        model_parameters: Dict[str, object] = {}
        if weights is not None:
            model_parameters["weight"] = weights[index]
        if method.sparse:
            model_parameters["density"] = density
        entry: Dict[str, object] = {"model": str(Path(path).resolve())}
        if model_parameters:
            entry["parameters"] = model_parameters
        models.append(entry)
    return {
        "merge_method": method.merge_method,
        "base_model": str(Path(base).resolve()),
        "dtype": "float32",
        "parameters": parameters,
        "models": models,
    }


class Merger:
    """Runs recipes through the console scripts' click entry points, in this process."""

    def __init__(self) -> None:
        scripts = {e.name: e for e in entry_points(group="console_scripts")}
        missing = [n for n in ("mergekit-yaml", "mergekit-nan") if n not in scripts]
        if missing:
            raise RuntimeError(f"console scripts not installed: {', '.join(missing)}")
        self._yaml: Callable = scripts["mergekit-yaml"].load()
        self._nan: Callable = scripts["mergekit-nan"].load()
        self.calls = 0

    def merge(
        self,
        method: Method,
        config: Dict[str, object],
        work: Path,
        seed: int,
        adapters: bool = False,
    ) -> Path:
        """Write ``config`` to ``work/recipe.yml``, merge into ``work/merged``, return that.

        With ``adapters`` the models are LoRA adapters and ``mergekit-nan merge``
        writes one merged LoRA adapter (at every granularity).
        """
        from mergekit.io.tasks import LoaderCache

        work.mkdir(parents=True, exist_ok=True)
        path, out = work / "recipe.yml", work / "merged"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        options = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        options += ["--random-seed", str(seed)]
        echo = io.StringIO()
        try:
            with contextlib.redirect_stdout(echo):
                if method.granularity == "tensor" and not adapters:
                    self._yaml([str(path), str(out), *options], standalone_mode=False)
                else:
                    arguments = [str(path), str(out), "--granularity", method.granularity]
                    self._nan(["merge", *arguments, *options], standalone_mode=False)
        except Exception as error:
            raise RuntimeError(f"{method.tool} failed on {path}: {error}") from error
        finally:
            LoaderCache().flush_all()
            LoaderCache().loaders.clear()
        self.calls += 1
        return out


_LAYER = re.compile(r"^(model\.layers\.\d+)\.")


def group_of(name: str, granularity: str) -> str:
    """Which tensors share NAN's coefficients: one tensor, one transformer layer, or all.

    Tensors outside the layers (embeddings, final norm, ``lm_head``) are groups of
    one at ``layer`` granularity, as in ``mergekit-nan merge``.
    """
    if granularity == "model":
        return ""
    if granularity == "layer":
        match = _LAYER.match(name)
        return match.group(1) if match else name
    return name


def tensor_norms(
    base: State, experts: Sequence[State], nan_norm: str = "delta"
) -> Dict[str, List[float]]:
    """||x_i|| per tensor (float64), x_i = theta_i - base, or theta_i for ``weights``."""
    norms = {}
    for name in base:
        reference = base[name].double() if nan_norm == "delta" else 0.0
        norms[name] = [
            float(torch.linalg.vector_norm(e[name].double() - reference)) for e in experts
        ]
    return norms


def pooled_norms(norms: Dict[str, List[float]], granularity: str) -> Dict[str, List[float]]:
    """Each tensor's norms pooled over its group: sqrt(sum over the group of ||x_i,t||^2)."""
    squares: Dict[str, List[float]] = {}
    for name, values in norms.items():
        group = squares.setdefault(group_of(name, granularity), [0.0] * len(values))
        for i, value in enumerate(values):
            group[i] += value * value
    return {name: [math.sqrt(s) for s in squares[group_of(name, granularity)]] for name in norms}


def alphas(norms: Sequence[float], exponent: float) -> List[float]:
    """alpha_i ~ ||x_i||^-p, summing to one (zero norms get zero)."""
    inverse = [n**-exponent if n > 0 else 0.0 for n in norms]
    total = math.fsum(inverse)
    return [v / total for v in inverse] if total > 0 else [1.0 / len(norms)] * len(norms)


def model_norms(base: State, experts: Sequence[State]) -> List[float]:
    """Whole-model task-vector norms ||theta_i - base||."""
    norms = tensor_norms(base, experts)
    return [math.sqrt(math.fsum(v[i] ** 2 for v in norms.values())) for i in range(len(experts))]


def mean_tensor_alphas(base: State, experts: Sequence[State], exponent: float) -> List[float]:
    """NAN's per-tensor coefficients of each expert, averaged over the tensors."""
    per_tensor = [alphas(v, exponent) for v in tensor_norms(base, experts).values()]
    return [math.fsum(a[i] for a in per_tensor) / len(per_tensor) for i in range(len(experts))]


def expected_linear(
    method: Method, base: State, experts: Sequence[State], volumes: Sequence[int], lam: float
) -> State:
    """base + lambda * sum_i w_i (theta_i - base) in float64, w_i as ``method`` defines them."""
    weights = weights_of(method, volumes)
    shares: Dict[str, List[float]] = {}
    if weights is None:
        nan_norm = str(method.parameters.get("nan_norm", "delta"))
        exponent = float(method.parameters.get("nan_exponent", 1.0))  # type: ignore[arg-type]
        norms = pooled_norms(tensor_norms(base, experts, nan_norm), method.granularity)
        own = tensor_norms(base, experts) if nan_norm == "delta" else None
        for name, values in norms.items():
            shares[name] = alphas(values, exponent)
            if own is not None:  # a zero task vector adds nothing
                shares[name] = [0.0 if n == 0 else a for n, a in zip(own[name], shares[name])]
    merged = {}
    for name, tensor in base.items():
        w = weights if weights is not None else shares[name]
        delta = sum(wi * (e[name].double() - tensor.double()) for wi, e in zip(w, experts))
        merged[name] = tensor.double() + lam * delta
    return merged


def deviation(merged: State, expected: State, base: State) -> float:
    """max |merged - expected| over max |expected - base|: 0 for a correct merge."""
    error = max(float((merged[k].double() - expected[k]).abs().max()) for k in expected)
    scale = max(float((expected[k] - base[k].double()).abs().max()) for k in expected)
    return error / scale if scale > 0 else error


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(values: Sequence[float]) -> List[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for k in range(start, end + 1):
                out[order[k]] = (start + end) / 2.0
            start = end + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def lambda_grid(values: Sequence[float]) -> Tuple[float, ...]:
    """The grid, sorted and without repeats (a tie on validation picks the smaller lambda)."""
    return tuple(sorted(set(float(v) for v in values)))
