"""The one door to mergekit's internals: every private name the plugin uses, and why.

The rest of the package calls the functions here; it never reaches a
``_``-prefixed mergekit name itself, nor replaces or wraps a mergekit function
(``tests/test_mergekit_compat.py`` enforces both, and checks that the installed
mergekit still has every name in :data:`PRIVATE_NAMES`).

* ``mergekit.plan.MergePlanner._plan``: plans a recipe without merging it
  (:func:`plan_recipe`); the recipe guard wraps it (:func:`wrap_loaded`);
* ``mergekit.plan.MergePlanner._tensors``: the plan, each output tensor with
  its task (:func:`planned_tasks`);
* ``mergekit.plan.MergePlanner._current_module_layers``: the layer being
  planned (:func:`module_layers`);
* ``mergekit.merge._model_out_config``: the output model's config, which the
  planner needs (:func:`plan_recipe`);
* ``mergekit.merge_methods.base.GroupMergeMethod._execute_resolved``:
  overridden so that a NAN method can answer with its coefficients instead of
  the merged tensor (:class:`ResolvedGroups`);
* ``mergekit.merge_methods.registry.get`` and ``mergekit.merge_methods.get``:
  replaced, to explain an unknown ``<method>+nan`` (:func:`wrap_method_lookup`);
* ``mergekit.io.tensor_writer.TensorWriter.save_tensor``: replaced within a
  block, to check each merged tensor (:func:`checking_saved_tensors`);
* ``mergekit.merge.run_merge`` and the click callbacks of ``mergekit-yaml``
  (``mergekit.scripts.run_yaml.main``) and ``mergekit-multi``
  (``mergekit.scripts.multimerge.main``): wrapped by the recipe guard
  (:func:`wrap_loaded`).

The functions import mergekit when called, not when this module is imported:
the start-up hook reaches them while mergekit's own modules are still loading.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

if TYPE_CHECKING:
    import torch
    from mergekit.architecture import WeightInfo
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Task
    from mergekit.merge_methods.base import BatchOptions, TensorGroup
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

__all__ = [
    "PRIVATE_NAMES",
    "PrivateName",
    "ResolvedGroups",
    "Wrapper",
    "checking_saved_tensors",
    "missing_private_names",
    "module_layers",
    "plan_recipe",
    "planned_tasks",
    "wrap",
    "wrap_loaded",
    "wrap_method_lookup",
]


class PrivateName(NamedTuple):
    """A mergekit name the plugin relies on: where it lives, what it is, why it is needed."""

    module: str
    name: str
    why: str


PRIVATE_NAMES: Tuple[PrivateName, ...] = (
    PrivateName("mergekit.plan", "MergePlanner._plan", "plans a recipe without merging it"),
    PrivateName("mergekit.plan", "MergePlanner._tensors", "the planned output tensors and tasks"),
    PrivateName("mergekit.plan", "MergePlanner._current_module_layers", "the layer being planned"),
    PrivateName("mergekit.merge", "_model_out_config", "the output config the planner needs"),
    PrivateName(
        "mergekit.merge_methods.base",
        "GroupMergeMethod._execute_resolved",
        "NAN methods answer with coefficients when measuring",
    ),
    PrivateName("mergekit.merge_methods.registry", "get", "replaced: explains unknown +nan"),
    PrivateName("mergekit.merge_methods", "get", "replaced with the registry's get"),
    PrivateName(
        "mergekit.io.tensor_writer", "TensorWriter.save_tensor", "replaced: checks merged tensors"
    ),
    PrivateName("mergekit.merge", "run_merge", "wrapped by the recipe guard"),
    PrivateName("mergekit.scripts.run_yaml", "main.callback", "wrapped by the recipe guard"),
    PrivateName("mergekit.scripts.multimerge", "main.callback", "wrapped by the recipe guard"),
)
"""Every mergekit name this module reaches past mergekit's public API, in the table's order."""

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]
"""Makes the replacement of a mergekit function from the original."""

Planner = TypeVar("Planner", bound="MergePlanner")

_MARK = "_mergekit_nan"
"""Set on every function this module installed, so that installing twice wraps once."""


def _has(owner: Any, name: str) -> bool:
    """Whether ``owner`` has ``name``: an attribute, or one a class declares for its instances."""
    if hasattr(owner, name):
        return True
    return isinstance(owner, type) and any(
        name in getattr(cls, "__annotations__", {}) for cls in owner.__mro__
    )


def missing_private_names() -> List[str]:
    """The names of :data:`PRIVATE_NAMES` that the installed mergekit lacks, as ``module.name``."""
    missing = []
    for entry in PRIVATE_NAMES:
        try:
            owner: Any = importlib.import_module(entry.module)
        except ImportError:
            missing.append(f"{entry.module}.{entry.name}")
            continue
        *path, last = entry.name.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not _has(owner, last):
            missing.append(f"{entry.module}.{entry.name}")
    return missing


# -- the planner ------------------------------------------------------------------------


def plan_recipe(
    config: MergeConfiguration,
    options: MergeOptions,
    planner_class: Optional[Type[Planner]] = None,
) -> Planner:
    """A ``planner_class`` planner (mergekit's own by default) for ``config``, planned.

    The same steps as mergekit's ``run_merge`` up to ``MergePlanner._plan()``:
    architecture detection and the output model's config. The planner is
    marked so that the recipe guard stays out (the plugin's commands report
    findings themselves). Reads configs and whatever mergekit's loader cache
    holds for the models; reads no tensor data.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    planner = (planner_class or MergePlanner)(
        config,
        arch_info,
        options=options,
        out_model_config=_model_out_config(
            config, arch_info, trust_remote_code=options.trust_remote_code
        ),
    )
    planner._mergekit_nan_unguarded = True
    planner._plan()
    return planner  # type: ignore[return-value]


def planned_tasks(planner: MergePlanner) -> List[Tuple[WeightInfo, Task]]:
    """The plan of a planner on which ``_plan()`` has run: (output tensor, its task) pairs."""
    return planner._tensors


def module_layers(planner: MergePlanner) -> int:
    """The number of layers a planner has planned in its current module so far."""
    return planner._current_module_layers


# -- merge methods ----------------------------------------------------------------------


class ResolvedGroups:
    """Mixin before ``GroupMergeMethod``: :meth:`measured` may answer instead of the merge.

    mergekit's ``GroupMergeMethod`` computes every merge, from either entry
    point, in ``_execute_resolved`` with checked groups and bound parameters.
    """

    def measured(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        dtype: Optional[torch.dtype],
    ) -> Optional[Tuple[Any, ...]]:
        """What to return instead of the merged tensors; None merges as usual."""
        return None

    def _execute_resolved(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        *,
        dtype: Optional[torch.dtype] = None,
        out_dtype: Optional[torch.dtype] = None,
        batch_options: Optional[BatchOptions] = None,
    ) -> Tuple[Any, ...]:
        found = self.measured(groups, parameters, dtype)
        if found is not None:
            return found
        return super()._execute_resolved(  # type: ignore[misc]
            groups, parameters, dtype=dtype, out_dtype=out_dtype, batch_options=batch_options
        )


def wrap_method_lookup(wrapper: Wrapper) -> None:
    """Replace mergekit's method lookup by name (both names for it); idempotent."""
    import mergekit.merge_methods as merge_methods
    import mergekit.merge_methods.registry as registry

    wrap(registry, "get", wrapper)
    merge_methods.get = registry.get


@contextlib.contextmanager
def checking_saved_tensors(check: Callable[[str, Any], None]) -> Iterator[None]:
    """Inside the block mergekit's writer calls ``check(name, tensor)`` before saving a tensor."""
    from mergekit.io.tensor_writer import TensorWriter

    original = TensorWriter.save_tensor

    def save_tensor(self, name: str, tensor, clone: bool = False):
        check(name, tensor)
        return original(self, name, tensor, clone=clone)

    TensorWriter.save_tensor = save_tensor  # type: ignore[method-assign]
    try:
        yield
    finally:
        TensorWriter.save_tensor = original  # type: ignore[method-assign]


# -- wrapping -----------------------------------------------------------------------------


def wrap(owner: Any, name: str, wrapper: Wrapper) -> None:
    """Replace ``owner.name`` by ``wrapper(original)``, once; nothing if there is none."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, _MARK, False):
        return
    wrapped = wrapper(original)
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)


def wrap_loaded(
    *, plan: Wrapper, run_merge: Wrapper, yaml_command: Wrapper, multi_command: Wrapper
) -> None:
    """Wrap, in whichever of their modules mergekit has loaded so far, ``MergePlanner._plan``,
    ``run_merge`` and the callbacks of ``mergekit-yaml`` and ``mergekit-multi``; idempotent.

    Imports nothing: each module is wrapped as it finishes loading.
    """
    planning = sys.modules.get("mergekit.plan")
    if planning is not None and "_plan" in planning.MergePlanner.__dict__:
        wrap(planning.MergePlanner, "_plan", plan)
    merging = sys.modules.get("mergekit.merge")
    if merging is not None:
        wrap(merging, "run_merge", run_merge)
    for module, wrapper in (
        ("mergekit.scripts.run_yaml", yaml_command),
        ("mergekit.scripts.multimerge", multi_command),
    ):
        script = sys.modules.get(module)
        if script is not None:
            wrap(script.main, "callback", wrapper)
