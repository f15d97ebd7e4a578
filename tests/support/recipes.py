"""The suite's one recipe builder and writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml


def recipe(
    models: Sequence[object],
    method: str = "nan",
    *,
    base: Optional[object] = None,
    weights: Optional[Sequence[Any]] = None,
    parameters: Optional[Dict[str, Any]] = None,
    dtype: Optional[str] = "float32",
    **top: Any,
) -> Dict[str, Any]:
    """A mergekit recipe (a dict): ``method`` over ``models``.

    ``base`` becomes ``base_model``; ``weights[i]`` is model i's ``weight``
    setting (``None``: none); ``parameters`` the global parameters (left out
    when empty); ``dtype`` left out when ``None``; ``top`` further top-level
    keys (``tokenizer_source``, ``out_dtype``, ...). Paths become strings.
    """
    config: Dict[str, Any] = {"merge_method": method}
    if base is not None:
        config["base_model"] = str(base)
    entries = []
    for index, model in enumerate(models):
        entry: Dict[str, Any] = {"model": str(model)}
        if weights is not None and weights[index] is not None:
            entry["parameters"] = {"weight": weights[index]}
        entries.append(entry)
    config["models"] = entries
    if parameters:
        config["parameters"] = dict(parameters)
    if dtype is not None:
        config["dtype"] = dtype
    config.update(top)
    return config


def family_recipe(family: Sequence[Path], method: str = "nan", **parameters: Any) -> Dict:
    """A float32 recipe: ``family[0]`` as the base, the others as the models, ``parameters`` on top."""
    base, *tuned = family
    return recipe(tuned, method, base=base, parameters=parameters)


def write_recipe(path: Path, config: object) -> Path:
    """Write ``config`` to ``path``: a dict as YAML, a list as one YAML document per item
    (a multi-stage recipe), a string as it is (a broken recipe, say)."""
    if isinstance(config, str):
        text = config
    elif isinstance(config, list):
        text = yaml.safe_dump_all(config, sort_keys=False)
    else:
        text = yaml.safe_dump(config, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
