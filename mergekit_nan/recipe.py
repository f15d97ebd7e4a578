"""A recipe file, read once.

Every command reads its recipe through :func:`read_recipe`: one read of the
file and one YAML parse, kept in a :class:`RecipeFile` that the command hands
on (to the preflight check, the merge, the model card) instead of reading the
file again. :func:`load_recipe` is the shortcut for a single recipe as
mergekit's ``MergeConfiguration``. Questions about a recipe's method and
models (:func:`uses_nan`, :func:`check_models`, :func:`require_nan_recipe`)
live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import yaml
from mergekit import merge_methods
from mergekit.config import MergeConfiguration

from mergekit_nan.registration import is_nan_method, modifiable_methods, register_methods

__all__ = [
    "RecipeFile",
    "check_models",
    "load_recipe",
    "looks_like_repo",
    "parse_recipe",
    "read_recipe",
    "require_nan_recipe",
    "uses_nan",
]


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file's text and its YAML documents (empty documents dropped)."""

    path: str
    text: str
    documents: Tuple[Any, ...]

    def mapping(self) -> Dict[str, Any]:
        """The one recipe of the file; ``ValueError`` unless it is a single YAML mapping."""
        if len(self.documents) != 1 or not isinstance(self.documents[0], dict):
            raise ValueError(f"{self.path} is not a mergekit recipe (expected a YAML mapping)")
        return self.documents[0]

    def config(self) -> MergeConfiguration:
        """The one recipe as mergekit reads it (pydantic's ``ValidationError`` on bad values)."""
        return MergeConfiguration.model_validate(self.mapping())


def read_recipe(path: str) -> RecipeFile:
    """Read a recipe file once: ``FileNotFoundError`` when missing, ``yaml.YAMLError`` when
    it is not YAML."""
    with open(path, encoding="utf-8") as file:
        return parse_recipe(path, file.read())


def parse_recipe(path: str, text: str) -> RecipeFile:
    """A recipe file's text, already read, parsed (``yaml.YAMLError`` when it is not YAML)."""
    documents = tuple(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return RecipeFile(os.fspath(path), text, documents)


def load_recipe(path: str) -> MergeConfiguration:
    """Read a single mergekit YAML recipe; ``FileNotFoundError``/``ValueError`` on bad input."""
    return read_recipe(path).config()


def looks_like_repo(path: str) -> bool:
    """Whether a model path names a Hugging Face repository (``owner/name``), not a directory."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def check_models(config: MergeConfiguration) -> None:
    """Refuse a recipe whose local models (or LoRA adapters) do not exist."""
    for model in config.referenced_models():
        for part in (model.model, model.lora):
            if (
                part is not None
                and not looks_like_repo(part.path)
                and not os.path.exists(part.path)
            ):
                raise FileNotFoundError(f"model {model} not found: no such directory {part.path}")


def uses_nan(config: MergeConfiguration) -> bool:
    """Whether the recipe's merge method is ``nan`` or a ``<method>+nan`` (NAN coefficients)."""
    register_methods()
    return is_nan_method(merge_methods.get(config.merge_method))


def require_nan_recipe(config: MergeConfiguration) -> None:
    """Refuse a recipe without a NAN method, or with local models that do not exist."""
    if not uses_nan(config):
        choices = ", ".join(f"{m}+nan" for m in modifiable_methods())
        raise ValueError(
            f"the recipe's merge_method is {config.merge_method!r}, which does not use NAN "
            f"coefficients; use nan or one of {choices}"
        )
    check_models(config)
