"""The ``mergekit-nan`` command line: ``cli`` and one subpackage per capability.

``common`` (options, errors, preflight, outputs, signals), ``inspection``
(coefficients without merging, the premise, reports, freeze), ``adapters``
(LoRA recipes), ``merge`` (mergekit-nan merge and its model card) and
``compare`` (candidates merged and scored on held-out data); ``demo`` and
``tiny`` (the embedded default and its seeded checkpoints).

Imports run one way, in that order: a subpackage imports only those before it
(``tests/test_layout.py`` checks it), and nothing below imports a command.
"""
