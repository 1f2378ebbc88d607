"""Options and helpers shared by several commands (one place, like TIAToolbox's cli/common)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from histotile.cli import echo_err
from histotile.errors import HistotileError
from histotile.fileio import command_line
from histotile.options import PredictOptions, choices, field_default, field_type


def report_failure(subject: str, exc: Exception, debug: bool) -> None:
    """Print one line for a failed item of a multi-item command (re-raise with --debug)."""
    if debug:
        raise exc
    if isinstance(exc, HistotileError):
        if exc.subject is None:
            exc.subject = subject
        echo_err(f"error: {exc.one_line()}")
    else:
        echo_err(f"error: {subject}: {type(exc).__name__}: {exc} (run with --debug for details)")


def field_option(cls: type, name: str, *decls: str, help: str,  # click's name
                 **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option for field ``name`` of options class ``cls``: its default, its type and
    its choices (a ``Literal``) come from the field, so they are written once. The value is
    validated when the command builds the options object (one-line error)."""
    kind, _ = field_type(cls, name)
    default = field_default(cls, name)
    flag = f"--{name.replace('_', '-')}"
    params = (*decls, flag) if decls else (flag,)
    if kind is bool:
        return click.option(*params, name, is_flag=True, default=default, help=help, **kwargs)
    if getattr(kind, "__origin__", None) is not None and choices(kind):
        click_type: Any = click.Choice(choices(kind))
    else:
        click_type = kind if kind in (int, float, str) else str
    kwargs.setdefault("show_default", default is not None)
    return click.option(*params, name, type=click_type, default=default, help=help, **kwargs)


def slide_mpp_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--slide-mpp`` (the same field in every options class that has it)."""
    return field_option(PredictOptions, "slide_mpp", metavar="UM",
                        help="Override the slide's level-0 microns per pixel (when missing or "
                             "wrong).")(f)


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return field_option(PredictOptions, "backend", help="Slide reader.")(f)


def debug_flag(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("debug"))


def invoked_command(ctx: click.Context) -> str:
    """The command line as the user typed it (``histotile ...``), for run metadata."""
    return command_line((ctx.find_root().obj or {}).get("argv", sys.argv[1:]))


def quiet_flag(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("quiet"))
