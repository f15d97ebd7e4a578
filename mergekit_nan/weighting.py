"""NAN's reading of one tensor, with errors that name names: the one home of NAN's rule.

The merge methods (``nan`` and ``<method>+nan``) and the inspector call
:func:`group_weighting` on a mergekit tensor group: it picks x_i per the
``nan_norm`` rule and runs the norm pass. The adapter path, which knows its
norms from the LoRA factors, calls :func:`norm_weighting` with them, as
:func:`group_weighting` does with the norms it measured: the formula (the
pure math in :mod:`mergekit_nan.coefficients`), the priors, the scale, the
zero-norm rule (:meth:`Weighting.update_coefficients`) and the checks of a
scale (:func:`check_scale`, :func:`weight_total`) each live here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Hashable, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import TensorEntry, TensorGroup

from mergekit_nan.coefficients import coefficients_from_norms
from mergekit_nan.errors import RecipeError, TensorError, TensorTypeError
from mergekit_nan.norms import NonFiniteInputError, norms_and_sums
from mergekit_nan.parameters import NanNorm
from mergekit_nan.shared_norms import NormTable, active_table

__all__ = [
    "Weighting",
    "check_scale",
    "group_weighting",
    "norm_weighting",
    "uses_base",
    "weight_total",
    "without_zero_updates",
]


@dataclass(frozen=True)
class Weighting:
    """NAN's reading of one tensor group, as plain numbers.

    ``models``, ``norms`` (||x_i||) and ``shares`` (alpha_i, summing to one)
    are aligned. ``scale`` is ``lambda`` for ``nan`` (1 without a base) and the
    user's weight total for ``<method>+nan``; ``weights`` are the values the
    merge uses: the shares for ``nan``, shares times the total for composites.
    ``sums`` (sum of the elements of each x_i) and ``numel`` are measured only
    when asked for (``moments=True``), for the zero-mean premise; ``delta``
    says whether the x_i are task vectors (else the tensors themselves).
    """

    models: Tuple[Hashable, ...]
    norms: Tuple[float, ...]
    shares: Tuple[float, ...]
    priors: Optional[Tuple[float, ...]]
    exponent: float
    scale: float
    scales_weights: bool
    sums: Optional[Tuple[float, ...]] = None
    numel: int = 0
    delta: bool = False

    @property
    def weights(self) -> Tuple[float, ...]:
        if not self.scales_weights:
            return self.shares
        return tuple(share * self.scale for share in self.shares)

    def with_norms(self, norms: Sequence[float]) -> Weighting:
        """The same reading with other norms (e.g. whole-model norms), shares recomputed."""
        values = torch.tensor(list(norms), dtype=torch.float64)
        prior = None if self.priors is None else torch.tensor(self.priors, dtype=torch.float64)
        shares = coefficients_from_norms(values, exponent=self.exponent, prior=prior)
        return replace(self, norms=tuple(norms), shares=tuple(shares.tolist()))

    def update_coefficients(self, norms: Optional[Sequence[float]] = None) -> Tuple[float, ...]:
        """``nan``'s multiplier c_i of each model: ``scale * share_i / sum_j share_j``.

        The merge is ``theta_b + sum_i c_i (theta_i - theta_b)`` with a base, else
        ``sum_i c_i theta_i``. With task vectors (``delta``) a zero x_i gets exactly 0
        (:func:`without_zero_updates`); ``norms`` are the x_i's own norms when the
        shares come from pooled ones (default: :attr:`norms`).
        """
        total = math.fsum(self.shares)
        values = [self.scale * share / total for share in self.shares]
        if not self.delta:
            return tuple(values)
        return without_zero_updates(values, self.norms if norms is None else norms)


def without_zero_updates(
    coefficients: Sequence[float], norms: Sequence[float]
) -> Tuple[float, ...]:
    """The zero-norm rule for a merged update: a zero task vector adds exactly nothing.

    Tensors no fine-tune touched then come out bit-identical to the base, and a
    LoRA update that is zero adds no rank.
    """
    return tuple(0.0 if norm == 0 else value for norm, value in zip(norms, coefficients))


def _label(tensor: Optional[str]) -> str:
    return repr(tensor) if tensor else "(unnamed tensor)"


def check_scale(
    tensor: Optional[str], parameter: str, value: float, dtype: torch.dtype, *, nonzero: bool
) -> None:
    """Refuse a scale (``lambda``, a weight total) beyond ``dtype``'s range, or zero if ``nonzero``.

    A zero weight total would silently give every model weight 0 (and make a
    normalising method divide by zero); a value above the dtype's range would
    turn the merged tensor into Inf. The message names the parameter and ``tensor``.
    """
    if nonzero and value == 0:
        raise RecipeError(
            f"{parameter} is 0 for tensor {_label(tensor)}: every model would get "
            "weight 0 (a normalising method would divide by zero); give weights with "
            "a non-zero sum, or none (the total is then 1)"
        )
    limit = torch.finfo(dtype).max
    if not abs(value) <= limit:
        raise RecipeError(
            f"{parameter} = {value:g} overflows {str(dtype).replace('torch.', '')} "
            f"(largest value {limit:g}) in tensor {_label(tensor)}; the merged tensor "
            "would be Inf"
        )


def weight_total(
    method: str,
    tensor: Optional[str],
    weights: Sequence[Tuple[Hashable, Optional[float]]],
    dtype: torch.dtype,
) -> float:
    """The scale of ``<method>+nan``'s weights: the sum of the user's ``weight`` values, else 1.

    ``weights`` pairs each model with its given weight (None: none given). Weights
    for some models but not all, and a total that :func:`check_scale` refuses
    (zero, or beyond ``dtype``), raise; the messages name ``method`` and ``tensor``.
    """
    given = [weight for _, weight in weights if weight is not None]
    if given and len(given) != len(weights):
        missing = [str(model) for model, weight in weights if weight is None]
        raise TensorError(
            f"{method}: tensor {tensor!r} has a weight for "
            f"some models but not for {', '.join(missing)}; give every model a "
            "weight (it sets the total) or none"
        )
    total = sum(given) if given else 1.0
    check_scale(tensor, "the weight total", total, dtype, nonzero=True)
    return total


def uses_base(group: TensorGroup, nan_norm: NanNorm) -> bool:
    """Whether x_i are task vectors for this group; ``delta`` without a base raises."""
    if nan_norm == "delta" and group.base is None:
        raise TensorError(
            f"nan_norm: delta needs a base model, but tensor {_label(group.metadata.name)} has "
            f"none (models: {', '.join(str(e.id) for e in group.entries)}); set "
            "base_model or use nan_norm: weights"
        )
    return group.base is not None and nan_norm != "weights"


def _norms(
    group: TensorGroup,
    inputs: Sequence[TensorEntry],
    base: Optional[torch.Tensor],
    scratch: Optional[torch.Tensor],
    moments: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The norm pass over ``inputs`` (and their sums with ``moments``); errors name the models."""
    try:
        return norms_and_sums(
            [entry.tensor for entry in inputs], base, scratch=scratch, with_sums=moments
        )
    except NonFiniteInputError as error:
        models = [str(inputs[index].id) for index in error.indices]
        if error.base:
            models.append(f"{group.base.id} (base)")
        raise TensorError(
            f"NaN or Inf values in tensor {_label(group.metadata.name)} of model(s) "
            f"{', '.join(models)}; NAN coefficients are undefined"
        ) from None


def group_weighting(
    group: TensorGroup,
    inputs: Sequence[TensorEntry],
    *,
    nan_norm: NanNorm,
    exponent: float,
    scale: float,
    scales_weights: bool,
    prior: Optional[Mapping[object, float]] = None,
    scratch: Optional[torch.Tensor] = None,
    moments: bool = False,
) -> Weighting:
    """NAN's reading of ``inputs``, a subset of ``group``, with one host sync.

    x_i is ``input - base`` when :func:`uses_base`, else the input itself;
    norms are computed on the inputs' device in float32 (float64 for float64
    inputs). ``prior`` maps input ids to non-negative weights; ``scratch`` is
    working memory for :func:`~mergekit_nan.norms.norms_and_sums`; with
    ``moments`` the same pass also sums each x_i. Inside
    :func:`~mergekit_nan.shared_norms.sharing` the norms come from the shared
    table where it has them (no pass, and no sums), and are filed there
    otherwise. Errors name the tensor and the model.
    """
    for entry in group.entries:
        if not entry.tensor.is_floating_point():
            raise TensorTypeError(
                f"NAN needs floating-point tensors; tensor {_label(group.metadata.name)} of "
                f"model {entry.id} is {entry.tensor.dtype}"
            )
    base = group.base.tensor if uses_base(group, nan_norm) else None
    table = active_table()
    key = None
    if table is not None and inputs:
        base_id = None if base is None else group.base.id
        key = NormTable.key(group.metadata.name, [e.id for e in inputs], base_id, inputs[0].tensor)
    norms = None if key is None else table.find(key, inputs[0].tensor.device)
    filed = norms is not None
    sums = None
    if not filed:
        norms, sums = _norms(group, inputs, base, scratch, moments)
    weighting = norm_weighting(
        tuple(entry.id for entry in inputs),
        norms,
        tensor=group.metadata.name,
        exponent=exponent,
        scale=scale,
        scales_weights=scales_weights,
        prior=None if prior is None else [prior[entry.id] for entry in inputs],
        sums=sums,
        numel=inputs[0].tensor.numel() if inputs else 0,
        delta=base is not None,
    )
    if key is not None and not filed:
        table.add(key, weighting.norms, norms.dtype)
    return weighting


def norm_weighting(
    models: Sequence[Hashable],
    norms: torch.Tensor,
    *,
    tensor: Optional[str],
    exponent: float,
    scale: float,
    scales_weights: bool,
    prior: Optional[Sequence[float]] = None,
    sums: Optional[torch.Tensor] = None,
    numel: int = 0,
    delta: bool = False,
) -> Weighting:
    """NAN's reading of precomputed norms ``||x_i||``, one per model, with one host sync.

    ``norms`` (and ``sums``, the sums of the x_i's elements, if known) are a 1-D
    tensor on any device, in the precision they were measured in; ``prior``
    holds each model's non-negative weight. The shares are
    :func:`~mergekit_nan.coefficients.coefficients_from_norms`'; an error names
    ``tensor``. :func:`group_weighting` calls this with the norms of its pass,
    the adapter path with the norms of the LoRA factors.
    """
    weights = None
    if prior is not None:
        weights = torch.tensor(list(prior), dtype=norms.dtype, device=norms.device)
    try:
        shares = coefficients_from_norms(norms, exponent=exponent, prior=weights)
    except ValueError as error:
        raise TensorError(f"{error} (tensor {_label(tensor)})") from None
    rows = [norms, shares.to(norms.dtype)] + ([] if sums is None else [sums.to(norms.dtype)])
    norms_list, shares_list, *sums_list = torch.stack(rows).tolist()
    return Weighting(
        models=tuple(models),
        norms=tuple(norms_list),
        shares=tuple(shares_list),
        priors=None if prior is None else tuple(prior),
        exponent=exponent,
        scale=scale,
        scales_weights=scales_weights,
        sums=tuple(sums_list[0]) if sums_list else None,
        numel=numel,
        delta=delta,
    )
