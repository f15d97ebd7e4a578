"""A recipe's models on disk, read without tensor data.

Models are found the way mergekit finds them (a local directory, else a
Hugging Face repository), but only in the local cache: nothing here touches
the network. Per model only ``config.json``, index files
(``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) and
safetensors headers (:mod:`mergekit_nan.doctor.safetensors_header`) are read.
``pytorch_model.bin`` checkpoints are pickles whose shapes cannot be known
without unpickling them, so they are left unread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mergekit.common import ModelPath, ModelReference

from mergekit_nan.doctor.safetensors_header import (
    HeaderError,
    TensorHeader,
    read_safetensors_header,
)
from mergekit_nan.recipe import looks_like_repo

__all__ = ["ModelFacts", "PlannedTensor", "collect_models", "model_places"]


@dataclass
class ModelFacts:
    """One model of a recipe as found on disk (``None`` fields: not found or not readable).

    ``label`` is the reference as written, ``places`` where the recipe names
    it; ``directory`` the local directory (a snapshot for a cached
    repository); ``tensors`` the safetensors headers (None for pickled
    weights); ``weight_bytes`` the size of the weight files; ``problems``
    what makes the model unusable (missing config, weights, shards);
    ``truncated`` files shorter than their headers say (the headers still
    describe the tensors, so checks go on).
    """

    reference: ModelReference
    label: str
    places: List[str]
    directory: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    tensors: Optional[Dict[str, TensorHeader]] = None
    shards: Dict[str, str] = field(default_factory=dict)  # tensor name -> shard file
    weight_bytes: int = 0
    pickled: bool = False
    missing: List[str] = field(default_factory=list)  # parts not found (model, adapter)
    problems: List[str] = field(default_factory=list)
    truncated: List[str] = field(default_factory=list)
    tokenizer_only: bool = False

    @property
    def where(self) -> str:
        return self.places[0]

    @property
    def usable(self) -> bool:
        return not self.missing and not self.problems and self.config is not None

    def header(self, names: Sequence[str]) -> Optional[TensorHeader]:
        """The header of the first of ``names`` this model stores (None if none or unknown)."""
        for name in names:
            if self.tensors is not None and name in self.tensors:
                return self.tensors[name]
        return None


def _reference(value: Any) -> Optional[ModelReference]:
    try:
        return ModelReference.model_validate(value)
    except Exception:
        return None


def _walk_models(data: Mapping[str, Any]) -> Iterator[Tuple[str, Any, bool]]:
    """(where, value as written, tokenizer only) for every model a recipe names."""

    def slices(prefix: str, items: Any) -> Iterator[Tuple[str, Any, bool]]:
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if not isinstance(item, Mapping):
                continue
            if item.get("base_model") is not None:
                yield f"{prefix}[{i}].base_model", item["base_model"], False
            for j, source in enumerate(item.get("sources") or ()):
                if isinstance(source, Mapping) and source.get("model") is not None:
                    yield f"{prefix}[{i}].sources[{j}].model", source["model"], False

    def models(prefix: str, items: Any) -> Iterator[Tuple[str, Any, bool]]:
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if isinstance(item, Mapping) and item.get("model") is not None:
                yield f"{prefix}[{i}].model", item["model"], False

    if data.get("base_model") is not None:
        yield "base_model", data["base_model"], False
    yield from models("models", data.get("models"))
    yield from slices("slices", data.get("slices"))
    modules = data.get("modules")
    for name, module in modules.items() if isinstance(modules, Mapping) else ():
        if isinstance(module, Mapping):
            yield from models(f"modules.{name}.models", module.get("models"))
            yield from slices(f"modules.{name}.slices", module.get("slices"))
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, Mapping):
        source, where = tokenizer.get("source"), "tokenizer.source"
    else:
        where = "tokenizer_source"
    if source is not None and source not in ("union", "base"):
        yield where, source, True


def model_places(data: Mapping[str, Any]) -> Dict[ModelReference, Tuple[str, List[str], bool]]:
    """Each model a recipe names: (label as first written, where it appears, tokenizer only)."""
    found: Dict[ModelReference, Tuple[str, List[str], bool]] = {}
    for where, value, tokenizer_only in _walk_models(data):
        reference = _reference(value)
        if reference is None:
            continue
        if reference in found:
            label, places, only = found[reference]
            found[reference] = (label, places + [where], only and tokenizer_only)
        else:
            label = value if isinstance(value, str) else str(reference)
            found[reference] = (label, [where], tokenizer_only)
    return found


def _find(path: ModelPath, marker: str, cache_dir: Optional[str]) -> Optional[str]:
    """A local directory, else the cached snapshot of a Hugging Face repository holding ``marker``."""
    if os.path.isdir(path.path):
        return os.path.abspath(path.path)
    if not looks_like_repo(path.path):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            path.path, marker, cache_dir=cache_dir, revision=path.revision
        )
    except Exception:  # not a valid repository id
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _read_weights(facts: ModelFacts) -> None:
    directory = facts.directory
    assert directory is not None
    for stem in ("model.safetensors", "pytorch_model.bin"):
        single = os.path.join(directory, stem)
        index = single + ".index.json"
        if os.path.exists(index):
            try:
                weight_map = _read_json(index).get("weight_map")
            except (OSError, ValueError, RecursionError):
                weight_map = None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and os.path.basename(v) == v
                for k, v in weight_map.items()
            ):
                facts.problems.append(
                    f"{index} has no readable weight_map (tensor name -> shard file name)"
                )
                return
            facts.shards = dict(weight_map)
        elif os.path.exists(single):
            facts.shards = {}
        else:
            continue
        facts.pickled = stem.endswith(".bin")
        files = sorted(set(facts.shards.values())) if facts.shards else [stem]
        _read_files(facts, files)
        return
    facts.problems.append(f"no model.safetensors or pytorch_model.bin (or index) in {directory}")


def _read_files(facts: ModelFacts, files: Sequence[str]) -> None:
    tensors: Dict[str, TensorHeader] = {}
    for name in files:
        path = os.path.join(str(facts.directory), name)
        if not os.path.exists(path):
            facts.problems.append(f"shard {name} listed in its index is missing")
            continue
        size = os.path.getsize(path)
        facts.weight_bytes += size
        if facts.pickled:
            continue
        try:
            found, needed = read_safetensors_header(path)
        except HeaderError as error:
            facts.problems.append(str(error))
            continue
        except OSError as error:
            facts.problems.append(f"{path} cannot be read ({error.strerror or error})")
            continue
        if size < needed:
            facts.truncated.append(
                f"{name} is {size} bytes but its header describes {needed} (the file is truncated)"
            )
        tensors.update(found)
        if len(files) == 1 and not facts.shards:
            facts.shards = dict.fromkeys(found, name)
    facts.tensors = None if facts.pickled else tensors


def _locate(facts: ModelFacts, cache_dir: Optional[str]) -> None:
    reference = facts.reference
    markers = ("tokenizer_config.json", "config.json") if facts.tokenizer_only else ("config.json",)
    facts.directory = next(
        (d for d in (_find(reference.model, m, cache_dir) for m in markers) if d), None
    )
    if facts.directory is None:
        facts.missing.append(str(reference.model))
    if (
        reference.lora is not None
        and _find(reference.lora, "adapter_config.json", cache_dir) is None
    ):
        facts.missing.append(str(reference.lora))
    if facts.directory is None or facts.tokenizer_only:
        return
    config_path = os.path.join(facts.directory, "config.json")
    if not os.path.exists(config_path):
        facts.problems.append(f"no config.json in {facts.directory}")
        return
    try:
        facts.config = _read_json(config_path)
    except ValueError as error:
        facts.problems.append(f"config.json is not valid JSON ({error})")
        return
    _read_weights(facts)


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def collect_models(
    data: Mapping[str, Any],
    *,
    cache_dir: Optional[str] = None,
    produced: Sequence[str] = (),
) -> List[ModelFacts]:
    """Locate and read every model ``data`` names, offline; ``produced`` names earlier stages.

    References to a name in ``produced`` (a mergekit-multi stage output that
    does not exist yet) are left out.
    """
    models = []
    for reference, (label, places, tokenizer_only) in model_places(data).items():
        if reference.model.path in produced:
            continue
        facts = ModelFacts(reference, label, places, tokenizer_only=tokenizer_only)
        _locate(facts, cache_dir)
        models.append(facts)
    return models


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of mergekit's plan: the input tensor of each model it reads.

    ``inputs`` pairs each model with the names mergekit tries for it (the
    name, then its aliases and tied names); ``base`` is the slice's base model.
    """

    name: str
    inputs: Tuple[Tuple[ModelReference, Tuple[str, ...]], ...]
    vocabulary_axis: Optional[int] = None
    force_dtype: Optional[str] = None
    base: Optional[ModelReference] = None
