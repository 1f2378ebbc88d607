"""Cluster engines for batch runs: SLURM job arrays and dask (LocalCluster / dask-jobqueue).

Nothing here schedules work itself: a SLURM array task runs ``histotile predict`` on its shard
(taken from ``SLURM_ARRAY_TASK_*`` by :func:`histotile.batch.resolve_shard`), and the dask
executors map :func:`histotile.batch.process_item` (the same per-item lock / temp folder /
``run.json`` / rename as a serial run) over workers and write the manifest on the client.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from histotile.batch import (
    LOCK_DIR,
    LOCK_TIMEOUT_S,
    MANIFEST_FIELDS,
    BatchSummary,
    ItemResult,
    ProcessFn,
    error_line,
    error_policy,
    item_stems,
    manifest_name,
    process_item,
    settle_busy,
    shard_items,
    write_manifest,
)
from histotile.errors import HistotileError, InvalidArgumentError

DEFAULT_COMMAND = "histotile predict"


class SlurmError(HistotileError):
    """sbatch/squeue missing or refusing a job."""


# --------------------------------------------------------------------------- sbatch script

def _q(text: str | os.PathLike[str]) -> str:
    return shlex.quote(os.fspath(text))


def _absolute(text: str) -> str:
    """Absolute form of an input (globs too), so the job does not depend on its cwd."""
    return text if os.path.isabs(text) else os.path.join(os.getcwd(), text)


def slurm_script(inputs: Sequence[str], out_dir: str | os.PathLike[str], array_size: int,
                 gpus_per_task: int = 1, cpus_per_task: int = 4, time: str = "04:00:00",
                 partition: str | None = None, mem: str | None = None,
                 predict_args: Sequence[str] = (), *, command: str = DEFAULT_COMMAND,
                 job_name: str = "histotile", max_running: int | None = None,
                 setup: Sequence[str] = (), extra_directives: Sequence[str] = ()) -> str:
    """An sbatch array script: task ``i`` of ``array_size`` runs ``command`` on shard i.

    Each task runs ``<command> INPUT... -o OUT --workers $SLURM_CPUS_PER_TASK <predict_args>``;
    the shard needs no flag (it is read from ``SLURM_ARRAY_TASK_*``). Logs go to
    ``OUT/logs/%A_%a.out`` (the folder must exist before submission: ``submit`` creates it).
    ``setup`` lines (``module load ...``, ``source venv/bin/activate``) run first.
    """
    if array_size < 1:
        raise InvalidArgumentError(f"array size {array_size}", hint="use at least 1 task",
                                   subject="--array-size")
    if not inputs:
        raise InvalidArgumentError("no input given", hint="name a folder, glob or list file")
    out = os.path.abspath(out_dir)
    array = f"0-{array_size - 1}" + (f"%{max_running}" if max_running else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if gpus_per_task > 0:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    lines.append(f"#SBATCH --time={time}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    lines.append(f"#SBATCH --output={out}/logs/%A_%a.out")
    lines += [f"#SBATCH {d}" for d in extra_directives]
    lines += [
        "# Written by `histotile slurm script`. Each array task processes the shard",
        "# SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT; finished slides are skipped, so",
        "# resubmitting after a failure or timeout only does what is left.",
        "set -euo pipefail",
        *setup,
        'echo "histotile array task ${SLURM_ARRAY_TASK_ID} of ${SLURM_ARRAY_TASK_COUNT}'
        ' on $(hostname)"',
        " ".join([command, *map(_q, map(_absolute, inputs)), "-o", _q(out),
                  '--workers "${SLURM_CPUS_PER_TASK:-1}"', *map(_q, predict_args)]),
    ]
    return "\n".join(lines) + "\n"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SlurmError(f"{tool} not found", hint="run on a SLURM login node, or print the "
                         "script with `histotile slurm script` and submit it there",
                         subject=tool)
    return path


def submit(script: str, out_dir: str | os.PathLike[str] | None = None,
           sbatch_args: Sequence[str] = ()) -> str:
    """Submit ``script`` with ``sbatch --parsable``; returns the job id.

    With ``out_dir``, its ``logs/`` folder is created and the script saved there as
    ``histotile-<time>.sbatch`` for the record.
    """
    sbatch = _require("sbatch")
    if out_dir is not None:
        logs = Path(out_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"histotile-{time.strftime('%Y%m%d-%H%M%S')}.sbatch").write_text(script)
    proc = subprocess.run([sbatch, "--parsable", *sbatch_args], input=script, text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
        raise SlurmError(msg, hint="check the partition, time and GPU options", subject="sbatch")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id:
        raise SlurmError("sbatch printed no job id", hint="check sbatch's output",
                         subject="sbatch")
    return job_id


def job_states(job_id: str) -> dict[str, str]:
    """``{array task id: state}`` of a job still known to squeue (empty when it has left)."""
    squeue = _require("squeue")
    proc = subprocess.run([squeue, "-h", "-r", "-j", job_id, "-o", "%i %T"], text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:  # squeue refuses ids that have left the queue
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def wait_for_job(job_id: str, timeout: float = 3600.0, poll: float = 2.0) -> None:
    """Block until ``job_id`` has left the queue (raises SlurmError on timeout)."""
    deadline = time.monotonic() + timeout
    while job_states(job_id):
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still queued/running after {timeout:.0f} s",
                             hint="check squeue and the logs folder", subject="squeue")
        time.sleep(poll)


# --------------------------------------------------------------------------- status

def manifest_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """``manifest.csv`` and ``manifest-I-of-N.csv`` in ``out_dir``, oldest first."""
    out = Path(out_dir)
    files = [p for p in out.glob("manifest*.csv") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def merge_manifests(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """One row per slide over all manifests (the newest manifest wins), sorted by slide."""
    rows: dict[str, dict[str, str]] = {}
    for path in manifest_files(out_dir):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("slide"):
                    rows[row["slide"]] = {k: row.get(k) or "" for k in MANIFEST_FIELDS}
    return [rows[k] for k in sorted(rows)]


def in_progress(out_dir: str | os.PathLike[str]) -> list[str]:
    """Stems whose lock file exists (being processed now, or left by a killed run)."""
    locks = Path(out_dir) / LOCK_DIR
    return sorted(p.stem for p in locks.glob("*.lock")) if locks.is_dir() else []


def status_table(rows: Sequence[dict[str, str]], locked: Sequence[str] = ()) -> str:
    """Counts per status, locks in progress, and one line per failed slide."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"{'status':<8} {'slides':>6}"]
    lines += [f"{s:<8} {counts.get(s, 0):>6}" for s in ("done", "skipped", "failed")]
    lines.append(f"{'total':<8} {len(rows):>6}")
    if locked:
        lines.append(f"locked (in progress or killed): {len(locked)}: " + " ".join(locked[:10]))
    lines += [f"failed: {Path(r['slide']).name}: {r['error']}" for r in rows
              if r["status"] == "failed"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- dask

_PROCESS_CACHE: dict[str, ProcessFn] = {}


def _cached_process(process_factory: Callable[[], ProcessFn]) -> ProcessFn:
    """Build the process once per worker process (e.g. load the model once), then reuse it."""
    key = hashlib.sha1(pickle.dumps(process_factory)).hexdigest()
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE[key] = process_factory()
    return _PROCESS_CACHE[key]


def _dask_item(item: Path, stem: str, out_dir: Path, process_factory: Callable[[], ProcessFn],
               fingerprint: dict[str, Any], overwrite: bool, lock_timeout: float) -> ItemResult:
    """The task a dask worker runs: exactly :func:`histotile.batch.process_item`."""
    try:
        process = _cached_process(process_factory)
    except Exception as exc:  # building the process (loading a model) failed on this worker
        return ItemResult(str(item), "failed", error=error_line(exc))
    return process_item(item, stem, out_dir, process, fingerprint, overwrite=overwrite,
                        lock_timeout=lock_timeout)


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
                  print_summary: bool | None = None,
                  on_error: str | Callable[[Path, ItemResult], None] = "report",
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
    from distributed import Client, as_completed

    _, report = error_policy("report" if on_error == "raise" else on_error)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(Path(i).absolute(), s) for i, s in zip(items, item_stems(list(map(Path, items))),
                                                      strict=True)]
    if shard is not None:
        pairs = shard_items(pairs, *shard)
    paths = [p for p, _ in pairs]
    stems = [s for _, s in pairs]
    results: list[ItemResult | None] = [None] * len(paths)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc=f"slides ({executor})", unit="slide", file=sys.stderr)
    with make_cluster(executor, jobs, out, cluster, **cluster_kwargs) as clu, Client(clu) as client:
        futures = {
            client.submit(_dask_item, p, s, out, process_factory, fingerprint, overwrite,
                          lock_timeout, pure=False, key=f"histotile-{i}-{s}"): i
            for i, (p, s) in enumerate(zip(paths, stems, strict=True))
        }
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:  # the worker died (OOM, segfault) or lost the task
                results[i] = ItemResult(str(paths[i]), "failed", error=error_line(exc))
            if results[i].status == "failed" and report is not None:
                report(paths[i], results[i])
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    summary = BatchSummary(shard=shard,
                           results=[settle_busy(r, fingerprint) for r in results if r])
    summary.manifest = write_manifest(out / manifest_name(shard), summary.results)
    if print_summary if print_summary is not None else progress:
        print(summary.table(), file=sys.stderr)
    return summary
