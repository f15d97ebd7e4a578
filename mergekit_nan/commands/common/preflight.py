"""What every ``mergekit-nan`` command checks before it reads a tensor or writes a file.

:func:`preflight` runs ``mergekit-nan check`` on the recipe: its warnings go to
stderr and its first error stops the command; it reads the recipe file once
(:func:`mergekit_nan.recipe.read_recipe`) and hands it back, so that the
command reads it no more. :func:`check_writable` refuses output files whose
directory is missing or that are directories, and :func:`single_document` a
multi-document (``mergekit-multi``) file where one recipe is expected.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import click
import yaml

from mergekit_nan.commands.common.options import merge_options
from mergekit_nan.recipe import RecipeFile, read_recipe

__all__ = ["check_writable", "preflight", "single_document"]


def check_writable(*paths: Optional[str]) -> None:
    for path in paths:
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no such directory for output {path}: {directory}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"output {path} is a directory")


def preflight(
    config_file: str,
    arguments: Dict[str, Any],
    out_path: Optional[str] = None,
    ignore: Tuple[str, ...] = (),
    single: bool = False,
) -> RecipeFile:
    """Run ``check`` first: warnings go to stderr; the first error stops the command (exit 1).

    ``out_path`` is checked too (``output-overwrites-input``); findings whose
    code is in ``ignore`` are not shown; ``single`` refuses a multi-document
    file first (:func:`single_document`). Returns the recipe file, read once.
    """
    from mergekit_nan.doctor.check import check_recipe, unreadable_report

    try:
        recipe: Optional[RecipeFile] = read_recipe(config_file)
    except yaml.YAMLError as error:
        recipe = None
        report = unreadable_report(config_file, error)
    else:
        if single:
            single_document(recipe)
        report = check_recipe(recipe, out_path=out_path, options=merge_options(arguments))
    report = dataclasses.replace(
        report, findings=tuple(f for f in report.findings if f.code not in ignore)
    )
    if report.errors:
        first = report.errors[0]
        text = first.line()[len("error: ") :]
        more = len(report.errors) - 1
        if more:
            text += f" (and {more} more: mergekit-nan check {config_file} lists them)"
        raise click.ClickException(text)
    for line in report.lines(levels=("warning",)):
        click.echo(line, err=True)
    assert recipe is not None  # an unreadable file is an error above
    return recipe


def single_document(recipe: RecipeFile) -> None:
    """Refuse a multi-document (``mergekit-multi``) recipe with a message that says what to do."""
    count = len(recipe.documents)
    if count > 1:
        raise click.ClickException(
            f"{recipe.path} holds {count} recipes (a mergekit-multi file); mergekit-nan merge "
            "merges one: give each stage its own file and merge them in order with "
            "mergekit-nan merge, or run mergekit-multi (which checks NAN stages first)"
        )
