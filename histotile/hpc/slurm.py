"""SLURM job arrays: the sbatch script, submission, the queue, and the status of a run folder.

Nothing here schedules work itself: each array task runs a multi-item command (``histotile
predict`` by default, ``histotile tile`` works too) on its shard, which the command line takes
from ``SLURM_ARRAY_TASK_*`` (:func:`histotile.batch.shard_from_env`).
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from histotile.batch.locks import LOCK_DIR
from histotile.batch.state import MANIFEST_FIELDS, STATUSES
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

    Each task runs ``<command> INPUT... -o OUT <predict_args>``, plus ``--workers`` one less
    than ``$SLURM_CPUS_PER_TASK`` on GPU jobs only (reader processes feed the GPU and the main
    process keeps a core to launch batches and write outputs; on a CPU job the task's cores are
    better left to the model, so the command's own default applies). The
    shard needs no flag (the command line reads it from ``SLURM_ARRAY_TASK_*``). Logs go to
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
    workers = (['--workers "$(( ${SLURM_CPUS_PER_TASK:-1} > 1 ? ${SLURM_CPUS_PER_TASK:-1} - 1'
                ' : 0 ))"'] if gpus_per_task > 0 else [])
    lines += [
        "# Written by `histotile slurm script`. Each array task processes the shard",
        "# SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT; finished slides are skipped, so",
        "# resubmitting after a failure or timeout only does what is left.",
        "set -euo pipefail",
        *setup,
        'echo "histotile array task ${SLURM_ARRAY_TASK_ID} of ${SLURM_ARRAY_TASK_COUNT}'
        ' on $(hostname)"',
        " ".join([command, *map(_q, map(_absolute, inputs)), "-o", _q(out), *workers,
                  *map(_q, predict_args)]),
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
    """Counts per status, locks in progress, and one line per failed or busy slide."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"{'status':<8} {'slides':>6}"]
    lines += [f"{s:<8} {counts.get(s, 0):>6}" for s in STATUSES]
    lines.append(f"{'total':<8} {len(rows):>6}")
    if locked:
        lines.append(f"locked (in progress or killed): {len(locked)}: " + " ".join(locked[:10]))
    lines += [f"{r['status']}: {Path(r['slide']).name}: {r['error']}" for r in rows
              if r["status"] in ("failed", "busy")]
    return "\n".join(lines)
