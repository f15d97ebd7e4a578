"""Seeing a recipe's NAN coefficients without merging.

``coefficient_pass`` (the streaming pass over mergekit's plan), ``premise``
(NAN's reading of each model), ``report`` (tables, JSON, CSV, heatmap) and
``freeze`` (a stock recipe with the coefficients written out).
"""
