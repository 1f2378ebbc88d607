"""The dask executors: the same per-item work as a serial run, spread over dask workers.

``local`` is a ``distributed.LocalCluster`` of worker processes on this machine;
``dask-jobqueue`` starts workers as batch jobs (SLURM, PBS, SGE, LSF, HTCondor). Each task is
a run of consecutive items (:func:`chunk_pairs`): the worker builds the command's process once
and runs the task's items as a serial run does (:func:`histotile.batch.process_item`, or
overlapped by :mod:`histotile.batch.pipeline` when the process has stages: the next item
prepared and the previous one finished while one runs); results and the manifest are gathered
on the client.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from histotile.batch.locks import LOCK_TIMEOUT_S
from histotile.batch.pipeline import is_staged, run_staged
from histotile.batch.runner import (
    FOLDER,
    ErrorPolicy,
    Layout,
    ProcessFn,
    above_bar,
    error_policy,
    finish_summary,
    plan_items,
    process_item,
)
from histotile.batch.state import BatchSummary, ItemResult, error_line
from histotile.errors import InvalidArgumentError

_PROCESS_CACHE: dict[str, ProcessFn] = {}


def require_distributed(executor: str) -> None:
    """One clear line, not an ImportError traceback, when a dask executor is asked for without
    the ``[hpc]`` extra installed."""
    try:
        import distributed  # noqa: F401 - only whether it imports
    except ImportError:
        raise InvalidArgumentError(f"--executor {executor} needs dask's distributed, which is not "
                                   "installed", hint="pip install 'histotile[hpc]'",
                                   subject="--executor") from None


def _cached_process(process_factory: Callable[[], ProcessFn]) -> ProcessFn:
    """Build the process once per worker process (e.g. load the model once), then reuse it."""
    key = hashlib.sha1(pickle.dumps(process_factory)).hexdigest()
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE[key] = process_factory()
    return _PROCESS_CACHE[key]


MAX_CHUNK = 8  # items per dask task at most (overlap within a task, balance across tasks)


def chunk_pairs(pairs: Sequence[tuple[Path, str]], jobs: int) -> list[list[int]]:
    """Indices of ``pairs`` cut into runs of consecutive items, one dask task each: about four
    tasks per worker, at most :data:`MAX_CHUNK` items each, so items overlap inside a task and
    tasks still balance across workers."""
    size = max(1, min(MAX_CHUNK, len(pairs) // (max(1, jobs) * 4)))
    return [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]


def _dask_items(pairs: list[tuple[Path, str]], out_dir: Path,
                process_factory: Callable[[], ProcessFn], fingerprint: dict[str, Any],
                overwrite: bool, lock_timeout: float, layout: Layout = FOLDER
                ) -> list[ItemResult]:
    """The task a dask worker runs: its items as a serial run does, in order."""
    try:
        process = _cached_process(process_factory)
    except Exception as exc:  # noqa: BLE001 - building the process (loading a model) failed on this worker
        return [ItemResult(str(item), "failed", error=error_line(exc)) for item, _ in pairs]
    if is_staged(process):
        results: list[ItemResult] = []
        run_staged(pairs, out_dir, process, fingerprint, lambda _, r: results.append(r),
                   overwrite=overwrite, lock_timeout=lock_timeout, layout=layout)
        return results
    return [process_item(item, stem, out_dir, process, fingerprint, overwrite=overwrite,
                         lock_timeout=lock_timeout, layout=layout) for item, stem in pairs]


def make_cluster(executor: str, jobs: int, out_dir: Path, cluster: str = "slurm",
                 **cluster_kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` (``local``) or a ``dask_jobqueue`` cluster, scaled to jobs."""
    if executor == "local":
        from distributed import LocalCluster

        kwargs = {"n_workers": jobs, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None, **cluster_kwargs}
        return LocalCluster(**kwargs)
    if executor != "dask-jobqueue":
        raise InvalidArgumentError(f"unknown executor {executor!r}",
                                   hint="use serial, local or dask-jobqueue", subject="--executor")
    try:
        import dask_jobqueue
    except ImportError:
        raise InvalidArgumentError("dask-jobqueue is not installed",
                                   hint="pip install 'histotile[hpc]'",
                                   subject="--executor") from None
    classes = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster",
               "lsf": "LSFCluster", "htcondor": "HTCondorCluster"}
    if cluster not in classes:
        raise InvalidArgumentError(f"unknown cluster {cluster!r}",
                                   hint=f"use one of {', '.join(classes)}", subject="--cluster")
    kwargs = {"cores": 1, "processes": 1, "memory": "4GB", "walltime": "04:00:00",
              "python": sys.executable, "log_directory": str(out_dir / "logs" / "dask"),
              "job_name": "histotile-dask", **cluster_kwargs}
    Path(kwargs["log_directory"]).mkdir(parents=True, exist_ok=True)
    jq = getattr(dask_jobqueue, classes[cluster])(**kwargs)
    jq.scale(jobs=jobs)
    return jq


def run_with_dask(items: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                  process_factory: Callable[[], ProcessFn], fingerprint: dict[str, Any], *,
                  executor: str = "local", cluster: str = "slurm", jobs: int = 2,
                  overwrite: bool = False, progress: bool = True,
                  shard: tuple[int, int] | None = None, lock_timeout: float = LOCK_TIMEOUT_S,
                  print_summary: bool | None = None, on_error: ErrorPolicy = "report",
                  layout: Layout = FOLDER, stems: Sequence[str] | None = None,
                  **cluster_kwargs: Any) -> BatchSummary:
    """Map the per-item work over a dask cluster; results and ``manifest.csv`` on the client.

    ``process_factory`` must be picklable (a module-level function, or ``functools.partial``
    of one with plain settings); each worker calls it once and reuses the process it returns.
    ``executor``: ``local`` (``distributed.LocalCluster`` with ``jobs`` worker processes) or
    ``dask-jobqueue`` (``cluster`` = slurm/pbs/sge/lsf/htcondor, ``jobs`` batch jobs;
    ``cluster_kwargs`` go to the cluster class: queue, walltime, memory, job_extra_directives...).
    ``on_error``: ``"report"`` or a callable ``(item, result)`` called on the client per failure
    (``"raise"`` is not available across workers: failures are always recorded).
    """
    require_distributed(executor)
    from distributed import Client, as_completed

    _, report = error_policy("report" if on_error == "raise" else on_error)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(p.absolute(), s) for p, s in plan_items(items, shard, stems)]
    paths = [p for p, _ in pairs]
    stems = [s for _, s in pairs]
    results: list[ItemResult | None] = [None] * len(paths)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc=f"slides ({executor})", unit="slide", file=sys.stderr)
    chunks = chunk_pairs(pairs, jobs)
    with make_cluster(executor, jobs, out, cluster, **cluster_kwargs) as clu, Client(clu) as client:
        futures = {
            client.submit(_dask_items, [pairs[i] for i in chunk], out, process_factory,
                          fingerprint, overwrite, lock_timeout, layout, pure=False,
                          key=f"histotile-{chunk[0]}-{stems[chunk[0]]}"): chunk
            for chunk in chunks
        }
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                got: list[ItemResult] = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker died (OOM, segfault) or lost the task
                got = [ItemResult(str(paths[i]), "failed", error=error_line(exc)) for i in chunk]
            for i, result in zip(chunk, got, strict=True):
                results[i] = result
                if result.status == "failed" and report is not None:
                    with above_bar(bar):
                        report(paths[i], result)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    done = [(r, s) for r, s in zip(results, stems, strict=True) if r is not None]
    summary = BatchSummary(shard=shard, results=[r for r, _ in done])
    return finish_summary(summary, out, [s for _, s in done], fingerprint, layout,
                          print_summary if print_summary is not None else progress,
                          reported=report is not None)
