"""Where the per-item work runs: this process, a dask LocalCluster, dask-jobqueue, SLURM arrays.

:func:`run_items` is the single entry every multi-item command calls (``predict``, ``tile``):
``serial`` runs :func:`histotile.batch.run_batch` here; ``local`` / ``dask-jobqueue`` run the
same per-item work on dask workers, a run of consecutive items per task
(:mod:`histotile.hpc.dask_pool`). SLURM job arrays (:mod:`histotile.hpc.slurm`) run the command
itself once per shard. Wherever it runs, a process with stages (``predict``'s) has its items
overlapped (:mod:`histotile.batch.pipeline`): the next prepared and the previous finished while
one runs through the model.
Imports point one way: ``hpc`` uses ``batch``, never the reverse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from histotile.batch.runner import FOLDER, ErrorPolicy, Layout, ProcessFn, run_batch
from histotile.batch.state import BatchSummary
from histotile.errors import InvalidArgumentError
from histotile.hpc.dask_pool import make_cluster, run_with_dask
from histotile.hpc.slurm import (
    DEFAULT_COMMAND,
    SlurmError,
    in_progress,
    job_states,
    manifest_files,
    merge_manifests,
    slurm_script,
    status_table,
    submit,
    wait_for_job,
)

EXECUTORS = ("serial", "local", "dask-jobqueue")


def run_items(items: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              process_factory: Callable[[], ProcessFn], fingerprint: dict[str, Any], *,
              executor: str = "serial", jobs: int = 2, cluster: str = "slurm",
              shard: tuple[int, int] | None = None, overwrite: bool = False,
              progress: bool = True, on_error: ErrorPolicy = "report",
              cluster_kwargs: dict[str, Any] | None = None, layout: Layout = FOLDER,
              stems: Sequence[str] | None = None) -> BatchSummary:
    """Run ``process_factory()``'s ``process(item, tmp_dir) -> info`` over ``items`` with
    ``executor`` (see the module docstring); ``layout``/``stems`` as :func:`run_batch`."""
    if executor == "serial":
        return run_batch(items, out_dir, process_factory(), fingerprint, overwrite=overwrite,
                         shard=shard, progress=progress, on_error=on_error, layout=layout,
                         stems=stems)
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"unknown executor {executor!r}",
                                   hint=f"use one of {', '.join(EXECUTORS)}",
                                   subject="--executor")
    return run_with_dask(items, Path(out_dir), process_factory, fingerprint, executor=executor,
                         cluster=cluster, jobs=jobs, overwrite=overwrite, progress=progress,
                         shard=shard, on_error=on_error, layout=layout, stems=stems,
                         **(cluster_kwargs or {}))


__all__ = [
    "DEFAULT_COMMAND", "EXECUTORS", "SlurmError", "in_progress", "job_states", "make_cluster",
    "manifest_files", "merge_manifests", "run_items", "run_with_dask", "slurm_script",
    "status_table", "submit", "wait_for_job",
]
