"""mergekit's planner, run by the plugin itself for ``inspect`` and ``check``.

Both need the plan mergekit would make for a recipe (the output tensors, their
inputs and resolved parameters) without merging: :func:`plan_recipe` runs the
same steps as mergekit's ``run_merge`` up to ``MergePlanner._plan()``, with
architecture detection and the output model's config, and marks the planner
so that the stock-command guard stays out (the plugin's commands report
findings themselves).
"""

from __future__ import annotations

from typing import Type, TypeVar

from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

__all__ = ["plan_recipe"]

Planner = TypeVar("Planner", bound=MergePlanner)


def plan_recipe(
    config: MergeConfiguration,
    options: MergeOptions,
    planner_class: Type[Planner] = MergePlanner,  # type: ignore[assignment]
) -> Planner:
    """A ``planner_class`` planner for ``config`` on which ``_plan()`` has run.

    ``planner._tensors`` then pairs each output ``WeightInfo`` with its merge
    task. Reads configs and whatever mergekit's loader cache holds for the
    models; reads no tensor data.
    """
    arch_info = get_architecture_info(config, options)
    planner = planner_class(
        config,
        arch_info,
        options=options,
        out_model_config=_model_out_config(
            config, arch_info, trust_remote_code=options.trust_remote_code
        ),
    )
    planner._mergekit_nan_unguarded = True
    planner._plan()
    return planner
