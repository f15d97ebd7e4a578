"""The ``mergekit-nan`` command: ``cli`` and one module per job it does.

``inspect`` (the streaming coefficient pass), ``report`` (tables, JSON,
CSV, heatmap), ``freeze`` (a stock recipe with the coefficients written
out), ``merge`` (a NAN recipe at any granularity) with ``output`` (an output
directory replaced whole or not at all) and ``card`` (its model card),
``demo`` (the embedded default) and ``tiny`` (the demo's seeded checkpoints).

Imports run one way: commands use the doctor and the NAN core, and nothing
below imports a command.
"""
