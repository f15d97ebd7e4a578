"""NAN's premise, made visible: what the norms say about each model, and where they mislead.

NAN gives a model whose x_i has the larger norm the smaller coefficient,
reading a large update as a sign of little data or much noise. Whether that
helps depends on how the models were trained (see the README: with
comparable training lengths a large update signals overfitting; when training
length grew with data, it signals the best-trained model). What a user can
see before merging, per model (:func:`premise`):

* the whole-model norm ``sqrt(sum_t ||x_i,t||^2)`` over the tensors NAN
  weighs, its share of the models' total, and the norm of each layer;
* how far NAN moves from uniform weights: the largest over the smallest
  coefficient from the whole-model norms (with the recipe's exponent, without
  priors), and the median of that ratio over the tensors;
* the paper's own failure signature, updates that are not zero-centred: per
  tensor ``|mean(x_i)| / rms(x_i)`` (0 for a zero-mean update, 1 for a
  constant shift; its square is the part of ``||x_i||^2`` the mean carries),
  summarised per model as the part of ``||x_i||^2`` that per-tensor means
  carry, with the largest tensor.

Tensors where a mean carries at least a quarter of the squared norm
(``|mean|/rms >= MEAN_SHIFT_THRESHOLD``) are named in an ``info`` finding.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit.common import ModelReference

from mergekit_nan.commands.inspection.coefficient_pass import Inspection, TensorCoefficients
from mergekit_nan.doctor.findings import Finding
from mergekit_nan.weighting import Weighting

__all__ = [
    "MEAN_SHIFT_THRESHOLD",
    "ModelPremise",
    "Premise",
    "format_premise",
    "card_line",
    "premise",
    "premise_findings",
    "premise_of",
    "recorded_premise",
]

MEAN_SHIFT_THRESHOLD = 0.5
"""|mean(x_i)| / rms(x_i) from which a tensor is named: its mean carries >= 25% of ||x_i||^2."""

_NAMED = 5


@dataclass(frozen=True)
class ModelPremise:
    """One model as NAN sees it (``norm`` over every tensor NAN weighs)."""

    model: ModelReference
    norm: float
    share: float
    coefficient: float
    layer_norms: Dict[str, float]
    mean_share: float
    """Part of the squared norm carried by per-tensor means, sum_t n_t mean_t^2 / ||x_i||^2."""
    largest_shift: float
    largest_shift_tensor: Optional[str]
    shifted: Tuple[str, ...]
    """Tensors with |mean|/rms >= MEAN_SHIFT_THRESHOLD, in merge order."""


@dataclass(frozen=True)
class Premise:
    """The models as NAN sees them; ``delta``: the x_i are task vectors."""

    delta: bool
    tensors: int
    models: Tuple[ModelPremise, ...]
    spread: float
    """Largest over smallest whole-model coefficient (1: NAN is a plain average)."""
    tensor_spread: float
    """Median over the tensors of their largest over smallest coefficient."""


def _layer(tensor: TensorCoefficients, modules: int) -> Optional[str]:
    if tensor.layer is None:
        return None
    return f"{tensor.module} layer {tensor.layer}" if modules > 1 else f"layer {tensor.layer}"


def _ratio(values: List[float]) -> float:
    positive = [v for v in values if v > 0]
    return max(positive) / min(positive) if len(positive) > 1 else 1.0


def premise(inspection: Inspection) -> Premise:
    """The premise of ``inspection``'s merge, from the norms and sums it measured."""
    return premise_of(inspection.tensors, inspection.models, _exponent(inspection))


def recorded_premise(records: Sequence[Tuple[Optional[str], Weighting]]) -> Premise:
    """The premise from the weightings a merge recorded (no layers, no sums: see ``recording``)."""
    tensors = [
        TensorCoefficients(
            name=name or "",
            module="",
            slice_index=0,
            layer=None,
            kind=name or "",
            models=w.models,
            inputs=(name or "",) * len(w.models),
            norms=w.norms,
            shares=w.shares,
            weights=w.weights,
            scale=w.scale,
            delta=w.delta,
        )
        for name, w in records
    ]
    models = tuple(dict.fromkeys(m for t in tensors for m in t.models))
    exponent = records[0][1].exponent if records else 1.0
    return premise_of(tensors, models, exponent)


def premise_of(
    tensors: Sequence[TensorCoefficients], order: Sequence[ModelReference], exponent: float
) -> Premise:
    """The premise from per-tensor coefficients, models in ``order``."""
    modules = len({t.module for t in tensors})
    squares: Dict[ModelReference, float] = {}
    means: Dict[ModelReference, float] = {}
    layers: Dict[ModelReference, Dict[str, float]] = {}
    largest: Dict[ModelReference, Tuple[float, Optional[str]]] = {}
    shifted: Dict[ModelReference, List[str]] = {}
    for tensor in tensors:
        layer = _layer(tensor, modules)
        shifts = tensor.mean_shifts or (0.0,) * len(tensor.models)
        for model, norm, total, shift in zip(
            tensor.models, tensor.norms, tensor.sums or (0.0,) * len(tensor.models), shifts
        ):
            squares[model] = squares.get(model, 0.0) + norm * norm
            if tensor.numel:
                means[model] = means.get(model, 0.0) + total * total / tensor.numel
            if layer is not None:
                pooled = layers.setdefault(model, {})
                pooled[layer] = pooled.get(layer, 0.0) + norm * norm
            if shift > largest.get(model, (-1.0, None))[0]:
                largest[model] = (shift, tensor.name)
            if shift >= MEAN_SHIFT_THRESHOLD:
                shifted.setdefault(model, []).append(tensor.name)
    norms = {model: math.sqrt(value) for model, value in squares.items()}
    total = sum(norms.values())
    scores = {m: (n**-exponent if n > 0 else 0.0) for m, n in norms.items()}
    score_total = sum(scores.values()) or 1.0
    models = tuple(
        ModelPremise(
            model=model,
            norm=norms[model],
            share=norms[model] / total if total > 0 else 0.0,
            coefficient=scores[model] / score_total,
            layer_norms={k: math.sqrt(v) for k, v in layers.get(model, {}).items()},
            mean_share=means.get(model, 0.0) / squares[model] if squares[model] > 0 else 0.0,
            largest_shift=largest.get(model, (0.0, None))[0],
            largest_shift_tensor=largest.get(model, (0.0, None))[1],
            shifted=tuple(shifted.get(model, ())),
        )
        for model in order
        if model in norms
    )
    ratios = [_ratio(list(t.shares)) for t in tensors]
    return Premise(
        delta=bool(tensors) and all(t.delta for t in tensors),
        tensors=len(tensors),
        models=models,
        spread=_ratio([m.coefficient for m in models]),
        tensor_spread=statistics.median(ratios) if ratios else 1.0,
    )


def _exponent(inspection: Inspection) -> float:
    """The recipe's ``nan_exponent`` as the first tensor resolved it."""
    config = inspection.config
    value = (config.parameters or {}).get("nan_exponent", 1.0)
    return float(value) if isinstance(value, (int, float)) else 1.0


def premise_findings(found: Premise, labels: Dict[ModelReference, str]) -> List[Finding]:
    """``mean-shift`` info findings: per model, the tensors whose update is mostly a mean."""
    findings = []
    for model in found.models:
        if not model.shifted:
            continue
        named = ", ".join(model.shifted[:_NAMED])
        more = f" and {len(model.shifted) - _NAMED} more" if len(model.shifted) > _NAMED else ""
        findings.append(
            Finding(
                "info",
                "mean-shift",
                "",
                f"{labels[model.model]}: in {len(model.shifted)} tensor"
                f"{'' if len(model.shifted) == 1 else 's'} ({named}{more}) the mean of the "
                f"update carries at least a quarter of its squared norm (|mean|/rms >= "
                f"{MEAN_SHIFT_THRESHOLD}): NAN reads such a shift as noise, which the paper "
                "names as its limit",
                "compare the merge with uniform weights on held-out data",
                model.shifted[0],
            )
        )
    return findings


def format_premise(found: Premise, labels: Dict[ModelReference, str]) -> str:
    """Text: one row per model, the spread, and the norm of each layer."""
    what = "task vector theta_i - theta_base" if found.delta else "the tensor theta_i itself"
    header = ["model", "norm", "share", "coefficient", "mean part", "max |mean|/rms", "in"]
    rows = [
        [
            labels[m.model],
            f"{m.norm:.4g}",
            f"{100 * m.share:.1f}%",
            f"{m.coefficient:.4f}",
            f"{100 * m.mean_share:.2f}%",
            f"{m.largest_shift:.3f}",
            m.largest_shift_tensor or "-",
        ]
        for m in found.models
    ]
    lines = [
        f"NAN's reading (x_i = {what}; norms over the {found.tensors} tensors NAN weighs)",
        *_table(header, rows),
        f"NAN moves from uniform weights by {found.spread:.2f}x (largest over smallest "
        f"whole-model coefficient; per tensor, median {found.tensor_spread:.2f}x)",
    ]
    layer_names = list(dict.fromkeys(k for m in found.models for k in m.layer_norms))
    if layer_names:
        header = ["layer norm"] + [labels[m.model] for m in found.models]
        rows = [
            [name] + [f"{m.layer_norms.get(name, math.nan):.4g}" for m in found.models]
            for name in layer_names
        ]
        lines += [""] + _table(header, rows)
    return "\n".join(lines)


def card_line(found: Premise, labels: Dict[ModelReference, str]) -> str:
    """One line for the model card: the whole-model norms, their shares and the spread."""
    norms = ", ".join(
        f"{labels[m.model]} {m.norm:.4g} ({100 * m.share:.0f}%)" for m in found.models
    )
    what = "Task-vector norms" if found.delta else "Norms"
    return (
        f"{what} (whole model): {norms}; NAN's largest over smallest coefficient: "
        f"{found.spread:.2f}x from the whole-model norms, median {found.tensor_spread:.2f}x "
        "per tensor."
    )


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells: List[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    return [line(header), "-" * len(line(header))] + [line(row) for row in rows]
