"""Options and helpers shared by several commands (one place, like TIAToolbox's cli/common)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from histotile.errors import HistotileError


def report_failure(subject: str, exc: Exception, debug: bool) -> None:
    """Print one line for a failed item of a multi-item command (re-raise with --debug)."""
    if debug:
        raise exc
    if isinstance(exc, HistotileError):
        if exc.subject is None:
            exc.subject = subject
        click.echo(f"error: {exc.one_line()}", err=True)
    else:
        click.echo(f"error: {subject}: {type(exc).__name__}: {exc} (run with --debug for details)",
                   err=True)


def slide_mpp_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--slide-mpp", type=float, default=None,
        help="Override the slide's level-0 microns per pixel (when missing or wrong).",
    )(f)


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
        show_default=True, help="Slide reader.",
    )(f)


def debug_flag(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("debug"))


def invoked_command(ctx: click.Context) -> str:
    """The command line as the user typed it (``histotile ...``), for run metadata."""
    import shlex
    import sys

    root = ctx.find_root()
    argv = (root.obj or {}).get("argv", sys.argv[1:])
    return shlex.join(["histotile", *argv])


def quiet_flag(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("quiet"))
