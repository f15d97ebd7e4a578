"""Render an :class:`~mergekit_nan.commands.inspection.coefficient_pass.Inspection`.

Tables, JSON, CSV and a heatmap; the files are written atomically by
:func:`~mergekit_nan.commands.common.output.write_files`. matplotlib
is imported only for the heatmap (``pip install 'mergekit-nan[plot]'``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit.common import ModelReference

from mergekit_nan.commands.inspection.coefficient_pass import Inspection, TensorCoefficients

__all__ = [
    "MissingPlotDependency",
    "format_table",
    "model_labels",
    "require_matplotlib",
    "to_json",
    "write_csv",
    "write_heatmap",
    "write_json",
]


class MissingPlotDependency(RuntimeError):
    """matplotlib is not installed."""


def model_labels(models: Sequence[ModelReference]) -> Dict[ModelReference, str]:
    """Short, unique labels: directory names (``+adapter`` for LoRA), else full references."""

    def short(model: ModelReference) -> str:
        label = os.path.basename(model.model.path.rstrip("/")) or model.model.path
        if model.lora is not None:
            label += "+" + (os.path.basename(model.lora.path.rstrip("/")) or model.lora.path)
        return label

    labels = {model: short(model) for model in models}
    if len(set(labels.values())) != len(labels):
        return {model: str(model) for model in models}
    return labels


def _value_name(inspection: Inspection) -> str:
    return "weight" if inspection.merge_method.endswith("+nan") else "alpha"


def _scale_name(inspection: Inspection) -> str:
    return "total" if inspection.merge_method.endswith("+nan") else "lambda"


def _rows(inspection: Inspection, all_tensors: bool) -> List[Tuple[str, List[TensorCoefficients]]]:
    """Row label and the tensors it summarises, in merge order."""
    if all_tensors:
        return [(t.name, [t]) for t in inspection.tensors]
    rows: List[Tuple[str, List[TensorCoefficients]]] = []
    layer_rows: Dict[Tuple[str, int], List[TensorCoefficients]] = {}
    for tensor in inspection.tensors:
        if tensor.layer is None:
            rows.append((tensor.kind, [tensor]))
            continue
        key = (tensor.module, tensor.layer)
        if key not in layer_rows:
            layer_rows[key] = []
            prefix = f"{tensor.module} " if len({t.module for t in inspection.tensors}) > 1 else ""
            rows.append((f"{prefix}layer {tensor.layer}", layer_rows[key]))
        layer_rows[key].append(tensor)
    return rows


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def format_table(inspection: Inspection, *, all_tensors: bool = False) -> str:
    """A text table: one row per layer (mean over its tensors) or, with ``all_tensors``, per tensor."""
    labels = model_labels(inspection.models)
    value = _value_name(inspection)
    scales = {t.scale for t in inspection.tensors}
    per_row_scale = len(scales) > 1
    header = ["tensor" if all_tensors else "layer"] + [labels[m] for m in inspection.models]
    if per_row_scale:
        header.append(_scale_name(inspection))
    body = []
    for label, tensors in _rows(inspection, all_tensors):
        cells = [label]
        for model in inspection.models:
            found = [t.weights[t.models.index(model)] for t in tensors if model in t.models]
            mean = _mean(found)
            cells.append("-" if mean is None else f"{mean:.4f}")
        if per_row_scale:
            cells.append(f"{_mean([t.scale for t in tensors]):.4g}")
        body.append(cells)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    method = inspection.merge_method
    what = "per tensor" if all_tensors else "per layer, mean over its tensors"
    scale = "" if per_row_scale else f"; {_scale_name(inspection)} = {next(iter(scales), 1.0):.4g}"
    title = [
        f"{method}: {value} per model ({what}; {inspection.granularity} granularity{scale})",
    ]
    if inspection.model_norms:
        norms = ", ".join(f"{labels[m]} {inspection.model_norms[m]:.4g}" for m in inspection.models)
        title.append(f"whole-model norms: {norms}")
    rule = "-" * len(line(header))
    return "\n".join(title + [line(header), rule] + [line(row) for row in body])


def to_json(inspection: Inspection) -> Dict[str, Any]:
    """A JSON-ready dict: recipe facts, pooled norms and every tensor's coefficients.

    ``model_norms`` (model granularity) maps models to whole-model norms;
    ``layer_norms`` (layer granularity) lists each output layer's pooled norms;
    ``premise`` is :func:`~mergekit_nan.commands.inspection.premise.premise` (per model:
    norm, share, coefficient, layer norms, mean shift; the spread).
    """
    from mergekit_nan.commands.inspection.premise import premise

    found = premise(inspection)
    return {
        "merge_method": inspection.merge_method,
        "stock_method": inspection.inner_method,
        "granularity": inspection.granularity,
        "value": _value_name(inspection),
        "scale": _scale_name(inspection),
        "base_model": None if inspection.base_model is None else str(inspection.base_model),
        "models": [str(m) for m in inspection.models],
        "model_norms": None
        if inspection.model_norms is None
        else {str(m): norm for m, norm in inspection.model_norms.items()},
        "layer_norms": None
        if inspection.layer_norms is None
        else [
            {"module": module, "layer": layer, "norms": {str(m): n for m, n in norms.items()}}
            for (module, layer), norms in inspection.layer_norms.items()
        ],
        "premise": {
            "task_vectors": found.delta,
            "tensors": found.tensors,
            "spread": found.spread,
            "tensor_spread": found.tensor_spread,
            "models": [
                {
                    "model": str(m.model),
                    "norm": m.norm,
                    "share": m.share,
                    "coefficient": m.coefficient,
                    "layer_norms": m.layer_norms,
                    "mean_share": m.mean_share,
                    "largest_mean_shift": m.largest_shift,
                    "largest_mean_shift_tensor": m.largest_shift_tensor,
                    "mean_shifted_tensors": list(m.shifted),
                }
                for m in found.models
            ],
        },
        "skipped": list(inspection.skipped),
        "tensors": [
            {
                "name": t.name,
                "module": t.module,
                "layer": t.layer,
                "kind": t.kind,
                "scale": t.scale,
                "models": [
                    {
                        "model": str(model),
                        "input": name,
                        "norm": norm,
                        "share": share,
                        "weight": weight,
                        "mean_shift": shift,
                    }
                    for model, name, norm, share, weight, shift in zip(
                        t.models, t.inputs, t.norms, t.shares, t.weights, _shifts(t)
                    )
                ],
            }
            for t in inspection.tensors
        ],
    }


def _shifts(tensor: TensorCoefficients) -> Tuple[float, ...]:
    """|mean(x_i)| / rms(x_i) per model (0 where the sums were not measured)."""
    return tensor.mean_shifts or (0.0,) * len(tensor.models)


def write_json(path: str, inspection: Inspection) -> None:
    """Write :func:`to_json` to ``path``."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(to_json(inspection), file, indent=2)
        file.write("\n")


CSV_COLUMNS = (
    "tensor",
    "module",
    "layer",
    "kind",
    "model",
    "input",
    "norm",
    "share",
    "weight",
    "scale",
    "mean_shift",
)


def write_csv(path: str, inspection: Inspection) -> None:
    """One row per (tensor, model): the columns of :data:`CSV_COLUMNS`."""
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for t in inspection.tensors:
            for model, name, norm, share, weight, shift in zip(
                t.models, t.inputs, t.norms, t.shares, t.weights, _shifts(t)
            ):
                layer = "" if t.layer is None else t.layer
                writer.writerow(
                    [
                        t.name,
                        t.module,
                        layer,
                        t.kind,
                        str(model),
                        name,
                        repr(norm),
                        repr(share),
                        repr(weight),
                        repr(t.scale),
                        repr(shift),
                    ]
                )


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotDependency` with the install hint if matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlotDependency(
            "--plot needs matplotlib: pip install 'mergekit-nan[plot]'"
        ) from None


def _panels(inspection: Inspection) -> List[Tuple[str, List[str], List[List[float]]]]:
    """(title, row labels, shares[row][model]) per tensor kind; non-layer tensors last."""
    index = {model: i for i, model in enumerate(inspection.models)}
    nan_row = [math.nan] * len(inspection.models)
    by_kind: Mapping[str, Dict[str, List[float]]] = defaultdict(dict)
    other: Dict[str, List[float]] = {}
    modules = len({t.module for t in inspection.tensors}) > 1
    for t in inspection.tensors:
        row = list(nan_row)
        for model, share in zip(t.models, t.shares):
            row[index[model]] = share
        if t.layer is None:
            other[t.kind] = row
        else:
            kind = f"{t.module}: {t.kind}" if modules else t.kind
            by_kind[kind][str(t.layer)] = row
    panels = [(kind, list(rows), list(rows.values())) for kind, rows in by_kind.items()]
    if other:
        panels.append(("outside the layers", list(other), list(other.values())))
    return panels


def write_heatmap(path: str, inspection: Inspection) -> None:
    """A PNG heatmap of the shares (layers x models, one panel per tensor kind)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    labels = model_labels(inspection.models)
    columns = [labels[m] for m in inspection.models]
    panels = _panels(inspection)
    if not panels:
        raise ValueError("no tensors to plot")
    values = [v for _, _, rows in panels for row in rows for v in row if not math.isnan(v)]
    high = max(values) if values else 1.0
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    tallest = max(len(rows) for _, rows, _ in panels)
    cell_height = 0.28 if tallest > 8 else 0.45
    figure = Figure(
        figsize=(
            2.2 + 1.1 * len(columns) * ncols + 0.8,
            (1.6 + cell_height * tallest) * nrows + 0.8,
        ),
        layout="constrained",
    )
    axes = figure.subplots(nrows, ncols, squeeze=False)
    image = None
    annotate = tallest <= 12 and len(columns) <= 6
    for axis, (title, row_labels, rows) in zip(axes.flat, panels):
        image = axis.imshow(rows, vmin=0.0, vmax=high, cmap="viridis", aspect="auto")
        axis.set_title(title, fontsize=9)
        axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
        if title != "outside the layers":
            axis.set_ylabel("layer", fontsize=8)
        if annotate:
            for y, row in enumerate(rows):
                for x, share in enumerate(row):
                    if not math.isnan(share):
                        color = "black" if share > 0.6 * high else "white"
                        axis.text(
                            x, y, f"{share:.2f}", ha="center", va="center", fontsize=7, color=color
                        )
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the merge (sums to 1)")
    figure.suptitle(
        f"NAN coefficients: {inspection.merge_method} ({inspection.granularity} granularity)"
    )
    figure.savefig(path, format="png", dpi=110)
