"""A walk over a recipe as written: where each parameter is set, and to what.

The recipe is one YAML document as a mapping, as the user wrote it or as
``MergeConfiguration.model_dump(mode="json", exclude_none=True)`` gives it.
Nothing is validated or resolved here; the walk only names places:

* :func:`scopes`: every ``parameters`` mapping (top level, module, slice,
  slice source, model), with its path and the model it belongs to;
* :func:`scalars`: every scalar inside one setting (a plain value, the points
  of a gradient, the values of conditional filters), with its path;
* :func:`groups`: the model lists mergekit merges together (``models``, each
  slice's ``sources``), with their base model and the scopes that apply to
  them in mergekit's order of precedence.

Paths follow the recipe, e.g. ``models[1].parameters.nan_exponent`` or
``slices[0].sources[1].parameters.weight[2].value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from mergekit.common import ModelReference
from typing_extensions import Literal

from mergekit_nan.modifier import COMPOSITE_SUFFIX

__all__ = [
    "NAN_PREFIX",
    "Group",
    "Member",
    "Scalar",
    "Scope",
    "ScopeKind",
    "groups",
    "involves_nan",
    "is_plain",
    "model_name",
    "resolve_plain",
    "scalars",
    "scopes",
    "varying_parameters",
]

NAN_PREFIX = "nan_"
"""Every parameter the plugin adds starts with this."""

ScopeKind = Literal["global", "module", "slice", "model"]
"""``model`` is a per-model scope: an entry of ``models`` or a slice source."""


@dataclass(frozen=True)
class Scope:
    """One ``parameters`` mapping of the recipe."""

    where: str
    kind: ScopeKind
    parameters: Mapping[str, Any]
    model: Optional[str] = None


@dataclass(frozen=True)
class Scalar:
    """One scalar written in a setting, and its path."""

    where: str
    value: Any


@dataclass(frozen=True)
class Member:
    """One model of a group, with its own parameters (None when it has none)."""

    where: str
    model: str
    parameters: Optional[Mapping[str, Any]]


@dataclass(frozen=True)
class Group:
    """Models merged together, e.g. ``models`` or ``slices[0].sources``.

    ``shared`` holds the group-wide scopes in mergekit's precedence (slice,
    module, top level); a member's own parameters come before them.
    ``base`` is the group's base model (the slice's, else the recipe's).
    """

    where: str
    members: Tuple[Member, ...]
    shared: Tuple[Scope, ...]
    base: Optional[str]


def model_name(reference: Any) -> str:
    """A model reference as the user would write it (``path``, ``path+lora``)."""
    try:
        return str(ModelReference.model_validate(reference))
    except Exception:  # noqa: BLE001 - an invalid reference is named as written
        return str(reference)


def _parameters(item: Any) -> Mapping[str, Any]:
    parameters = item.get("parameters") if isinstance(item, Mapping) else None
    return parameters if isinstance(parameters, Mapping) else {}


def _items(container: Any, key: str) -> List[Any]:
    value = container.get(key) if isinstance(container, Mapping) else None
    return list(value) if isinstance(value, list) else []


def _model_scopes(prefix: str, items: Sequence[Any]) -> Iterator[Scope]:
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]"
        model = model_name(item.get("model")) if isinstance(item, Mapping) else None
        yield Scope(f"{where}.parameters", "model", _parameters(item), model)


def _slice_scopes(prefix: str, slices: Sequence[Any]) -> Iterator[Scope]:
    for index, output_slice in enumerate(slices):
        where = f"{prefix}slices[{index}]"
        yield Scope(f"{where}.parameters", "slice", _parameters(output_slice))
        yield from _model_scopes(f"{where}.sources", _items(output_slice, "sources"))


def _modules(data: Mapping[str, Any]) -> List[Tuple[str, Mapping[str, Any]]]:
    modules = data.get("modules")
    if not isinstance(modules, Mapping):
        return []
    return [(str(name), module) for name, module in modules.items() if isinstance(module, Mapping)]


def scopes(data: Mapping[str, Any]) -> Iterator[Scope]:
    """Every ``parameters`` mapping of the recipe, the top level first."""
    yield Scope("parameters", "global", _parameters(data))
    yield from _model_scopes("models", _items(data, "models"))
    yield from _slice_scopes("", _items(data, "slices"))
    for name, module in _modules(data):
        prefix = f"modules.{name}"
        yield Scope(f"{prefix}.parameters", "module", _parameters(module))
        yield from _model_scopes(f"{prefix}.models", _items(module, "models"))
        yield from _slice_scopes(f"{prefix}.", _items(module, "slices"))


def involves_nan(data: Mapping[str, Any]) -> bool:
    """True when the recipe uses ``nan`` or a ``<method>+nan`` method, or has a ``nan_*`` key.

    Cheap, and imports nothing beyond this module: the stock-command guard asks
    it of every recipe, and recipes without NAN must not pay for the checks.
    """
    method = data.get("merge_method")
    if isinstance(method, str) and (method == "nan" or method.endswith(COMPOSITE_SUFFIX)):
        return True
    return any(
        str(name).startswith(NAN_PREFIX) for scope in scopes(data) for name in scope.parameters
    )


def is_plain(setting: Any) -> bool:
    """Whether a setting is one plain value (no gradient, no filter)."""
    return not isinstance(setting, (list, Mapping))


def scalars(where: str, setting: Any) -> Iterator[Scalar]:
    """Every scalar of a setting: the value, a gradient's points, each filter's value."""
    if isinstance(setting, Mapping):
        if "value" in setting:
            yield from scalars(f"{where}.value", setting["value"])
    elif isinstance(setting, list):
        for index, item in enumerate(setting):
            yield from scalars(f"{where}[{index}]", item)
    elif setting is not None:
        yield Scalar(where, setting)


def varying_parameters(data: Mapping[str, Any]) -> Set[str]:
    """Names of the parameters that have a filter or a gradient somewhere."""
    return {
        name
        for scope in scopes(data)
        for name, setting in scope.parameters.items()
        if not is_plain(setting)
    }


def _members(prefix: str, items: Sequence[Any]) -> List[Member]:
    return [
        Member(f"{prefix}[{index}]", model_name(item.get("model")), item.get("parameters"))
        for index, item in enumerate(items)
        if isinstance(item, Mapping)
    ]


def groups(data: Mapping[str, Any]) -> Iterator[Group]:
    """The model lists of the recipe, each with its base and group-wide scopes.

    In the ``models`` form mergekit adds the base model as a source without
    parameters when it is not listed; it is a member here too (``base_model``).
    """
    top = Scope("parameters", "global", _parameters(data))
    base = model_name(data["base_model"]) if data.get("base_model") else None

    def with_base(members: List[Member]) -> Tuple[Member, ...]:
        if base is not None and base not in {member.model for member in members}:
            members = members + [Member("base_model", base, None)]
        return tuple(members)

    def slice_groups(prefix: str, slices: Sequence[Any], outer: Tuple[Scope, ...]):
        for index, output_slice in enumerate(slices):
            where = f"{prefix}slices[{index}]"
            own = Scope(f"{where}.parameters", "slice", _parameters(output_slice))
            own_base = output_slice.get("base_model") if isinstance(output_slice, Mapping) else None
            yield Group(
                f"{where}.sources",
                tuple(_members(f"{where}.sources", _items(output_slice, "sources"))),
                (own,) + outer,
                model_name(own_base) if own_base else base,
            )

    if data.get("models"):
        yield Group("models", with_base(_members("models", _items(data, "models"))), (top,), base)
    yield from slice_groups("", _items(data, "slices"), (top,))
    for name, module in _modules(data):
        prefix = f"modules.{name}"
        scope = Scope(f"{prefix}.parameters", "module", _parameters(module))
        if module.get("models"):
            members = with_base(_members(f"{prefix}.models", _items(module, "models")))
            yield Group(f"{prefix}.models", members, (scope, top), base)
        yield from slice_groups(f"{prefix}.", _items(module, "slices"), (scope, top))


def resolve_plain(name: str, scopes_in_order: Sequence[Mapping[str, Any]]) -> Tuple[bool, Any]:
    """``(found, value)`` of a parameter set by plain values, in precedence order."""
    for parameters in scopes_in_order:
        if parameters and parameters.get(name) is not None:
            return True, parameters[name]
    return False, None
