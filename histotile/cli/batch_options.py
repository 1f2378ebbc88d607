"""Options shared by every multi-slide command (predict, tile): shards, executors, overwrite.

Usage in a command::

    @click.command()
    @batch_options
    def predict(inputs, output, **kwargs):
        batch = pop_batch_options(kwargs)         # -> BatchOptions
        summary = run_items(items, output, partial(make_process, settings), fingerprint,
                            progress=not quiet, **batch.run_items_kwargs())
        sys.exit(summary.exit_code)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from histotile.cli import echo_err
from histotile.options import BatchOptions, Cluster, Executor, choices, field_default

if TYPE_CHECKING:
    from pathlib import Path

    from histotile.batch import ItemResult

BATCH_OPTION_NAMES = ("shard", "executor", "jobs", "cluster", "cluster_option", "overwrite")


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_cluster_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("queue=gpu", "cores=4")`` -> ``{"queue": "gpu", "cores": 4}``; list values for
    ``job_extra_directives`` / ``job_script_prologue`` accumulate."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--cluster-option")
        key = key.strip().replace("-", "_")
        if key in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
            out.setdefault(key, []).append(value)
        else:
            out[key] = _parse_value(value)
    return out


def pop_batch_options(kwargs: dict[str, Any]) -> BatchOptions:
    """Remove the batch options from a command's kwargs; return them as :class:`BatchOptions`
    (``.run_items_kwargs()`` gives :func:`histotile.batch.run_items`'s keywords)."""
    from histotile.batch import resolve_shard

    values = {name: kwargs.pop(name) for name in BATCH_OPTION_NAMES if name in kwargs}
    return BatchOptions(
        shard=resolve_shard(values.get("shard"), os.environ),
        executor=values.get("executor", field_default(BatchOptions, "executor")),
        jobs=values.get("jobs", field_default(BatchOptions, "jobs")),
        cluster=values.get("cluster", field_default(BatchOptions, "cluster")),
        overwrite=bool(values.get("overwrite", False)),
        cluster_kwargs=parse_cluster_options(tuple(values.get("cluster_option") or ())),
    )


def batch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --overwrite, --shard, --executor, --jobs, --cluster, --cluster-option."""
    options = [
        click.option("--overwrite", is_flag=True,
                     help="Recompute slides whose finished output already matches."),
        click.option("--shard", metavar="I/N", default=None,
                     help="Process only shard I of N (0-based). Default: from "
                          "SLURM_ARRAY_TASK_ID/COUNT inside a SLURM array job, else all."),
        click.option("--executor", type=click.Choice(choices(Executor)),
                     default=field_default(BatchOptions, "executor"), show_default=True,
                     help="serial: this process; local: a dask LocalCluster of --jobs "
                          "processes; dask-jobqueue: --jobs batch jobs on --cluster."),
        click.option("--jobs", type=int, default=field_default(BatchOptions, "jobs"),
                     show_default=True,
                     help="Workers (local) or batch jobs (dask-jobqueue)."),
        click.option("--cluster", type=click.Choice(choices(Cluster)),
                     default=field_default(BatchOptions, "cluster"), show_default=True,
                     help="Scheduler for --executor dask-jobqueue."),
        click.option("--cluster-option", multiple=True, metavar="KEY=VALUE",
                     help="Passed to the dask-jobqueue cluster, e.g. queue=gpu walltime=02:00:00 "
                          "memory=16GB cores=4 'job_extra_directives=--gpus-per-task=1'."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def quiet_dask(executor: str) -> None:
    """-q with a dask executor: dask's own INFO lines (scheduler, nanny, worker start and stop)
    are not printed. ``distributed`` sets its loggers' levels when imported, so import it
    first, then lower every ``distributed``/``dask`` logger to WARNING."""
    if executor == "serial":
        return
    try:
        import distributed  # noqa: F401 - configures its loggers at import time
    except ImportError:  # not installed: the run itself says so in one line
        return

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "dask", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.WARNING)


def failure_line(result: ItemResult) -> str:
    """``error: <item>: <message> (<hint>)`` for a failed item's result."""
    text = result.error
    if result.slide not in text:
        text = f"{result.slide}: {text}"
    return f"error: {text}"


def print_failure(item: Path, result: ItemResult) -> None:
    """``on_error`` of the commands: one ``error:`` line per failed item (Path, ItemResult)."""
    echo_err(failure_line(result))


class FailureReporter:
    """``on_error`` that prints one ``error:`` line per failed item, except that an error that
    does not name its item (a model that cannot be loaded fails every item the same way) is
    printed once; :meth:`close` then counts the other items it stopped."""

    def __init__(self) -> None:
        self.repeats: dict[str, list[str]] = {}

    def __call__(self, item: Path, result: ItemResult) -> None:
        if result.slide not in result.error:
            if result.error in self.repeats:
                self.repeats[result.error].append(str(result.slide))
                return
            self.repeats[result.error] = []
        echo_err(failure_line(result))

    def close(self) -> None:
        for others in self.repeats.values():
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                echo_err(f"(the same error stopped {len(others)} more item"
                         f"{'s' if len(others) > 1 else ''}: {shown})")
