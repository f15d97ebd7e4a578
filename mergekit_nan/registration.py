"""Make ``nan`` and the ``<method>+nan`` composites known to mergekit by name.

:func:`register_methods` is idempotent: it registers ``nan`` and one composite
for every method registered at that moment that declares ``weight``. The
start-up hook calls it as soon as ``mergekit.merge_methods`` is imported;
``import mergekit_nan`` calls it too.

mergekit's ``get`` answers an unknown name with a bare "Unimplemented merge
method"; for names ending in ``+nan`` it is wrapped to say which methods can
take NAN coefficients instead (still a ``RuntimeError``, as callers expect).
"""

from __future__ import annotations

from typing import Tuple

import mergekit.merge_methods.registry as registry
from mergekit.merge_methods import MergeMethod

from mergekit_nan.mergekit_compat import wrap_method_lookup
from mergekit_nan.method import NanMerge, nan_merge_method
from mergekit_nan.modifier import COMPOSITE_SUFFIX, NanCoefficients, takes_weight

__all__ = ["UnknownCompositeError", "is_nan_method", "modifiable_methods", "register_methods"]


class UnknownCompositeError(RuntimeError):
    """A ``<name>+nan`` method that does not exist."""


def is_nan_method(method: MergeMethod) -> bool:
    """Whether ``method`` sets NAN coefficients: ``nan`` or a ``<method>+nan`` composite."""
    return isinstance(method, (NanMerge, NanCoefficients))


def modifiable_methods() -> Tuple[str, ...]:
    """Names of registered methods that ``nan_coefficients`` can wrap."""
    return tuple(
        method.spec.name
        for method in registry.registered_methods()
        if takes_weight(method) and not is_nan_method(method)
    )


def _explained_get(get):
    def get_method(name: str) -> MergeMethod:
        try:
            return get(name)
        except RuntimeError:
            if not name.endswith(COMPOSITE_SUFFIX):
                raise
        inner = name[: -len(COMPOSITE_SUFFIX)]
        known = {m.spec.name for m in registry.registered_methods()}
        reason = (
            f"{inner!r} declares no per-model weight"
            if inner in known
            else f"there is no merge method {inner!r}"
        )
        choices = ", ".join(m + COMPOSITE_SUFFIX for m in modifiable_methods())
        raise UnknownCompositeError(
            f"Unknown merge method {name!r}: {reason}, so NAN cannot set its "
            f"coefficients. Methods that take NAN coefficients: nan, {choices}"
        )

    get_method.__wrapped__ = get
    get_method.__doc__ = get.__doc__
    return get_method


def register_methods() -> None:
    """Register ``nan`` and ``<method>+nan`` for each weight-taking method; idempotent."""
    registered = {method.spec.name for method in registry.registered_methods()}
    for method in (nan_merge_method,) + tuple(
        NanCoefficients(registry.get(name)) for name in modifiable_methods()
    ):
        if method.spec.name not in registered:
            registry.register(method)
    wrap_method_lookup(_explained_get)
