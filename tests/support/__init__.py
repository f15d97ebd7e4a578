"""What the tests share: one float64 NAN reference, one recipe builder, one command runner.

* :mod:`support.reference`: the float64 NAN formula of ``docs/recipes.md``
  (:func:`nan_alphas`, :func:`nan_weights`, :func:`nan_merge`).
* :mod:`support.recipes`: :func:`build_recipe` builds a recipe, :func:`write_recipe` writes
  one; :func:`parsed`, :func:`only`, :func:`finding_codes` and :func:`report_codes` read
  the recipe doctor's findings.
* :mod:`support.runner`: :func:`run_command` runs ``mergekit-nan`` or a stock
  command in this process and returns a :class:`subprocess.CompletedProcess`
  (:func:`run_merge` and :func:`run_mergekit_yaml` are its two common calls);
  :func:`start_child` runs one in a real (forked) process.
* :mod:`support.checkpoints`: the tensors of a checkpoint directory, LoRA adapters.
* :mod:`support.pages`: the code blocks of the docs and the benchmark scripts they run.

Fixtures live in ``conftest.py``; test modules import helpers from here, never
from each other.
"""

from .checkpoints import (
    load_model_tensors,
    snapshot,
    stored_shapes,
    tensor_nbytes,
    tensors_of,
    write_lora_adapter,
)
from .pages import (
    BENCHMARKS,
    DOCUMENTED,
    REPO,
    Block,
    benchmark_folder,
    benchmark_script,
    blocks,
    commands,
    documented_arguments,
    imported_benchmark,
    run_benchmark,
)
from .recipes import (
    build_recipe,
    family_recipe,
    finding_codes,
    only,
    parsed,
    report_codes,
    weighted_recipe,
    write_recipe,
)
from .reference import (
    TOLERANCE,
    nan_alphas,
    nan_merge,
    nan_weights,
    relative_error,
    report,
    task_vector_norm,
)
from .runner import (
    STALL_MARKER,
    Child,
    assert_clean_failure,
    command,
    run_command,
    run_merge,
    run_mergekit_yaml,
    start_child,
    wait_for,
)

__all__ = [
    "BENCHMARKS",
    "DOCUMENTED",
    "REPO",
    "STALL_MARKER",
    "TOLERANCE",
    "Block",
    "Child",
    "assert_clean_failure",
    "benchmark_folder",
    "benchmark_script",
    "blocks",
    "build_recipe",
    "command",
    "commands",
    "documented_arguments",
    "imported_benchmark",
    "family_recipe",
    "finding_codes",
    "load_model_tensors",
    "nan_alphas",
    "nan_merge",
    "nan_weights",
    "only",
    "parsed",
    "relative_error",
    "report",
    "report_codes",
    "run_benchmark",
    "run_command",
    "run_merge",
    "run_mergekit_yaml",
    "snapshot",
    "start_child",
    "stored_shapes",
    "task_vector_norm",
    "tensor_nbytes",
    "tensors_of",
    "wait_for",
    "weighted_recipe",
    "write_lora_adapter",
    "write_recipe",
]
