"""The suite's one recipe builder and writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


def build_recipe(
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
    return build_recipe(tuned, method, base=base, parameters=parameters)


def weighted_recipe(family: Sequence[Path], *, base: bool, **parameters: Any) -> Dict:
    """nan over ``family[1:]`` with weight 2.0 on the first fine-tune (priors 2, 1, 1),
    with ``family[0]`` as the base or without one; no dtype."""
    return build_recipe(
        family[1:],
        base=family[0] if base else None,
        weights=[2.0] + [None] * (len(family) - 2),
        parameters=parameters,
        dtype=None,
    )


def write_recipe(path: Path, config: object) -> Path:
    """Write ``config`` to ``path``: a dict as YAML, a list as one YAML document per item
    (a multi-stage recipe), a string as it is (a broken recipe, say).

    Keys are sorted, as mergekit writes a recipe back (``mergekit_config.yml``, the card).
    """
    if isinstance(config, str):
        text = config
    elif isinstance(config, list):
        text = yaml.safe_dump_all(config)
    else:
        text = yaml.safe_dump(config)
    path.write_text(text, encoding="utf-8")
    return path


def parsed(text: str) -> Dict:
    """A recipe written as YAML text, as the doctor's recipe checks take it."""
    return yaml.safe_load(text)


def only(findings: Sequence, code: str):
    """The one finding with ``code`` (fails unless there is exactly one)."""
    matching = [f for f in findings if f.code == code]
    assert len(matching) == 1, findings
    return matching[0]


def finding_codes(findings: Sequence) -> List[str]:
    """The sorted codes of ``findings``."""
    return sorted(f.code for f in findings)


def report_codes(report) -> List[Tuple[str, str]]:
    """(level, code) of a check report's findings, the estimate left out."""
    return [(f.level, f.code) for f in report.findings if f.code != "estimate"]
