"""``histotile slurm script|submit|status``: SLURM array jobs over a folder of slides."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DEFAULT_MAX_ARRAY = 100


class _SplitDashDash(click.Command):
    """Keeps everything after ``--`` aside (in ``ctx.meta["tail"]``): the predict options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            args, ctx.meta["tail"] = args[:cut], args[cut + 1:]
        else:
            ctx.meta["tail"] = []
        return super().parse_args(ctx, args)


def _script_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("inputs", nargs=-1, required=True),
        click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Output folder (shared by all tasks)."),
        click.option("--array-size", type=click.IntRange(min=1), default=None,
                     help=f"Array tasks (shards). Default: one per slide, at most "
                          f"{DEFAULT_MAX_ARRAY}."),
        click.option("--gpus-per-task", type=click.IntRange(min=0), default=1, show_default=True),
        click.option("--cpus-per-task", type=click.IntRange(min=1), default=4, show_default=True,
                     help="On GPU jobs also the reader workers (--workers) of each task."),
        click.option("--time", "time_limit", default="04:00:00", show_default=True,
                     help="Wall time per task."),
        click.option("--partition", default=None),
        click.option("--mem", default=None, help="Memory per node, e.g. 32G."),
        click.option("--max-running", type=click.IntRange(min=1), default=None,
                     help="At most this many tasks at once (--array=0-N%K)."),
        click.option("--setup", multiple=True, metavar="LINE",
                     help="Shell line run first in each task (module load ..., source venv).",),
        click.option("--command", "job_command", default="histotile predict", show_default=True,
                     help="Per-shard command: it must accept INPUT... -o OUT (and --workers N "
                          "on GPU jobs), e.g. 'histotile tile'."),
        click.option("--job-name", default="histotile", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build_script(ctx: click.Context, inputs: tuple[str, ...], out_dir: str,
                  array_size: int | None, **kw: Any) -> str:
    from histotile.batch import expand_inputs
    from histotile.hpc import slurm_script

    if array_size is None:
        array_size = min(len(expand_inputs(inputs)), DEFAULT_MAX_ARRAY)
    return slurm_script(
        list(inputs), out_dir, array_size, gpus_per_task=kw["gpus_per_task"],
        cpus_per_task=kw["cpus_per_task"], time=kw["time_limit"], partition=kw["partition"],
        mem=kw["mem"], predict_args=ctx.meta.get("tail", []), command=kw["job_command"],
        job_name=kw["job_name"], max_running=kw["max_running"], setup=kw["setup"])


@click.group()
def slurm() -> None:
    """Write, submit and follow SLURM array jobs (one shard of the slides per task).

    \b
    histotile slurm script SLIDES/ -o OUT --gpus-per-task 1 -- --model NAME > job.sbatch
    histotile slurm submit SLIDES/ -o OUT --partition gpu -- --model NAME
    histotile slurm status OUT
    """


@slurm.command(cls=_SplitDashDash)
@_script_options
@click.pass_context
def script(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, array_size: int | None,
           **kw: Any) -> None:
    """Print an sbatch array script; options after -- go to histotile predict.

    Creates OUT/logs (SLURM needs the log folder to exist).
    """
    text = _build_script(ctx, inputs, out_dir, array_size, **kw)
    (Path(out_dir) / "logs").mkdir(parents=True, exist_ok=True)
    click.echo(text, nl=False)


@slurm.command(cls=_SplitDashDash)
@_script_options
@click.option("--wait", is_flag=True, help="Wait for the job to leave the queue, then show status.")
@click.pass_context
def submit(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, array_size: int | None,
           wait: bool, **kw: Any) -> None:
    """Submit the array job with sbatch and print its id."""
    from histotile import hpc

    text = _build_script(ctx, inputs, out_dir, array_size, **kw)
    job_id = hpc.submit(text, out_dir)
    click.echo(job_id)
    if wait:
        hpc.wait_for_job(job_id)
        _print_status(out_dir)


def _print_status(out_dir: str, write: bool = False) -> list[dict[str, str]]:
    from histotile import hpc

    rows = hpc.merge_manifests(out_dir)
    click.echo(hpc.status_table(rows, hpc.in_progress(out_dir)))
    if write and rows:
        from histotile.batch import ItemResult, write_manifest

        results = [ItemResult(r["slide"], r["status"], r["error"],
                              int(r["patches"]) if r["patches"] else None,
                              float(r["seconds"] or 0), r["output"]) for r in rows]
        path = write_manifest(Path(out_dir) / "manifest.csv", results)
        click.echo(f"merged manifest: {path}")
    return rows


@slurm.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--job", "job_id", default=None, help="Also show this job's tasks in squeue.")
@click.option("--write", is_flag=True, help="Write the merged rows to OUT_DIR/manifest.csv.")
def status(out_dir: str, job_id: str | None, write: bool) -> None:
    """Merge the shard manifests of OUT_DIR: counts per status and failed slides."""
    from histotile import hpc

    if job_id:
        states = hpc.job_states(job_id)
        if states:
            for task, state in sorted(states.items()):
                click.echo(f"{task} {state}")
        else:
            click.echo(f"job {job_id}: not in the queue (finished or unknown)")
    if not hpc.manifest_files(out_dir):
        click.echo(f"no manifest in {os.fspath(out_dir)} yet")
        return
    _print_status(out_dir, write=write)
