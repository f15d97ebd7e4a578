"""mergekit-nan: NAN merge coefficients (arXiv 2505.16148) for mergekit.

Importing this package registers the ``nan`` method and the ``<method>+nan``
composites with mergekit (the installed start-up hook does the same lazily).

The package has three parts:

* the NAN core, at the package root: ``coefficients`` (norms to coefficients,
  plain torch), ``parameters``, ``weighting`` (one tensor group), ``granularity``,
  ``measure``, ``method`` (``nan``), ``modifier`` (``<method>+nan``),
  ``registration``, ``planning`` and ``errors``;
* ``doctor``: the recipe checks behind ``mergekit-nan check`` and the guard
  of the stock commands;
* ``commands``: the ``mergekit-nan`` command line and its jobs.

Imports run one way: commands -> doctor -> core. The core imports neither.
"""

from mergekit_nan.coefficients import (
    coefficients_from_norms,
    frobenius_norms,
    tensor_coefficients,
)
from mergekit_nan.method import NanMerge, nan_merge_method
from mergekit_nan.modifier import NanCoefficients, nan_coefficients
from mergekit_nan.registration import modifiable_methods, register_methods

__all__ = [
    "NanCoefficients",
    "NanMerge",
    "coefficients_from_norms",
    "frobenius_norms",
    "modifiable_methods",
    "nan_coefficients",
    "nan_merge_method",
    "register_methods",
    "tensor_coefficients",
]
__version__ = "0.1.0"

register_methods()
