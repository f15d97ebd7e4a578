"""mergekit-nan: NAN merge coefficients (arXiv 2505.16148) for mergekit.

Importing this package registers the ``nan`` method and the ``<method>+nan``
composites with mergekit (the installed start-up hook does the same lazily).
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
