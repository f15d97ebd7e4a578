"""The plugin's error for a recipe that cannot be merged as written.

:class:`RecipeError` deliberately does not derive from ``ValueError``: pydantic
wraps a validator's ``ValueError`` in a ``ValidationError`` whose text starts
with internal names such as ``function-after[check(), float]``, while any other
exception reaches the user as raised. Its message stands on its own: it names
the parameter, the tensor or the model concerned, and how to fix it.
"""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(Exception):
    """A recipe (or a parameter of it) that NAN cannot merge; the message says why."""
