"""The plugin's errors: a recipe, or tensors, that NAN cannot merge as given.

Every error the plugin raises about a user's recipe or models is a
:class:`RecipeError`. Its message stands on its own: it names the parameter,
the tensor or the model concerned, and how to fix it.

:class:`RecipeError` is a ``click.ClickException``, so a command line that
reaches one (the stock ``mergekit-yaml`` and ``mergekit-multi`` as well as
``mergekit-nan``) ends with ``Error: <message>`` and exit status 1 instead of
a traceback; from Python it is an ordinary exception. It deliberately does
not derive from ``ValueError``: pydantic wraps a validator's ``ValueError``
in a ``ValidationError`` whose text starts with internal names such as
``function-after[check(), float]``, while any other exception reaches the
user as raised.

Errors found while merging (NaN in a checkpoint, non-float tensors, an
extrapolation that overflows the dtype) are :class:`TensorError`,
:class:`TensorTypeError` and :class:`TensorOverflowError`: also a
``ValueError``, ``TypeError`` and ``OverflowError`` respectively, for
callers that catch those.
"""

from __future__ import annotations

import click

__all__ = ["RecipeError", "TensorError", "TensorOverflowError", "TensorTypeError"]


class RecipeError(click.ClickException):
    """A recipe (or a parameter of it) that NAN cannot merge; the message says why."""


class TensorError(RecipeError, ValueError):
    """Tensors NAN cannot weigh (NaN or Inf values, no base for task vectors, zero priors)."""


class TensorTypeError(RecipeError, TypeError):
    """Tensors of a type NAN cannot weigh (integers, booleans)."""


class TensorOverflowError(RecipeError, OverflowError):
    """A merged tensor beyond its dtype's range (an extrapolating ``lambda``)."""
