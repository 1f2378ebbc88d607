"""The ``histotile`` command: a thin click layer over the library.

Sub-commands live in their own modules and are imported only when used, so
``histotile --help`` stays fast (no torch, zarr or dask import).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from histotile import __version__
from histotile.errors import HistotileError

# command name -> (module in histotile.cli, attribute, one-line help shown without importing)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("info", "info", "Describe a slide: backend, levels, mpp and its source."),
    "tile": ("tile", "tile", "Cut tissue patches at a target mpp into PCam-layout HDF5."),
    "predict": ("predict", "predict", "Run a patch classifier over slides or archives."),
    "train": ("train", "train", "Train a patch classifier (pcam, pathmnist, a folder)."),
    "evaluate": ("train", "evaluate", "Evaluate a model on a dataset with clinical metrics."),
    "models": ("models", "models", "List and show the bundled models."),
    "explain": ("explain", "explain", "Grad-CAM / attention grids for patch archives."),
    "export": ("export", "export", "Re-export finished results (QuPath GeoJSON, OME-TIFF)."),
    "render": ("render", "render", "Redraw a finished slide's pictures (class, threshold, ...)."),
    "describe": ("describe", "describe", "Dataset views: class balance, t-SNE, samples."),
    "slurm": ("slurm", "slurm", "Write, submit and follow SLURM array jobs."),
    "sample-data": ("sample_data", "sample_data", "Fetch (or find cached) sample data."),
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"histotile.cli.{COMMANDS[name][0]}") is not None


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f"histotile.cli.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histotile")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings only.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """histotile: patch classifiers over whole-slide images."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["quiet"] = quiet
    setup_logging(quiet)


class TqdmLogHandler(logging.Handler):
    """Writes log lines with ``tqdm.write``: on a line of their own above any progress bar,
    never glued to one. tqdm is imported on the first line logged, not at ``--help``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo_err(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def setup_logging(quiet: bool = False) -> None:
    """``LEVEL: message`` lines on stderr through :class:`TqdmLogHandler` (INFO, or WARNING with
    ``--quiet``); like ``logging.basicConfig``, nothing is added when the root logger already
    has handlers (a host application's, pytest's)."""
    handler = TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])


def echo_err(text: str) -> None:
    """One line on stderr above any running progress bar (``tqdm.write``), never glued to it."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exit, ``--debug`` for tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # with standalone_mode=False click returns ctx.exit(n)'s code instead of exiting
        rc = cli.main(args=args, prog_name="histotile", standalone_mode=False,
                      obj={"argv": list(args)})
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except HistotileError as exc:
        if debug:
            raise
        echo_err(f"error: {exc.one_line()}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)
