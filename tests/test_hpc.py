"""HPC layer without a scheduler: the sbatch script, status merging, CLI, local dask executor.

Real SLURM (submission, array tasks, dask-jobqueue) is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import real_data

from histotile import hpc
from histotile.batch import expand_inputs, make_probe_process, run_batch
from histotile.cli import cli
from histotile.cli.batch_options import batch_options, pop_batch_options
from histotile.hpc import run_items


def slide_folder(folder: Path, names: list[str], corrupt: str | None = None) -> Path:
    """Copies of the real CMU-1-Small-Region.svs; a GENERATED corrupt file if asked."""
    src = real_data("slides/CMU-1-Small-Region.svs")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src, folder / name)
    if corrupt:
        (folder / corrupt).write_bytes(b"GENERATED: not a slide\n" * 400)
    return folder


# --------------------------------------------------------------------------- script

def test_slurm_script_contents(tmp_path: Path) -> None:
    text = hpc.slurm_script(["slides dir/", "more/*.svs"], tmp_path / "out", 8, gpus_per_task=1,
                            cpus_per_task=6, time="02:00:00", partition="gpu", mem="32G",
                            predict_args=["--model", "my model", "--tta"], max_running=3,
                            setup=["module load cuda"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--array=0-7%3", "--cpus-per-task=6", "--gpus-per-task=1",
                      "--time=02:00:00", "--partition=gpu", "--mem=32G",
                      f"--output={tmp_path / 'out'}/logs/%A_%a.out"):
        assert f"#SBATCH {directive}" in lines
    run = lines[-1]
    assert run.startswith("histotile predict ")
    assert f"'{os.getcwd()}/slides dir/'" in run and f"{os.getcwd()}/more/*.svs" in run
    assert f"-o {tmp_path / 'out'}" in run and "--workers" in run
    assert run.endswith("--model 'my model' --tta")
    assert "--shard" not in text  # the array env vars give the shard
    assert lines.index("module load cuda") < len(lines) - 1
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash

    cpu = hpc.slurm_script(["a.svs"], "o", 1, gpus_per_task=0)
    assert "gpus" not in cpu and "#SBATCH --array=0-0" in cpu and "partition" not in cpu


def test_sbatch_gpu_job_leaves_the_main_process_a_core() -> None:
    """GPU array tasks ran `--workers $SLURM_CPUS_PER_TASK`: as many reader processes as the
    task's cores, none left for the process that launches batches and writes the outputs."""
    gpu = hpc.slurm_script(["a.svs"], "o", 2, gpus_per_task=1, cpus_per_task=8)
    run = gpu.splitlines()[-1]
    value = re.search(r'--workers ("[^"]*")', run)
    assert value is not None, run
    for cpus, workers in (("8", "7"), ("1", "0"), ("", "0")):
        env = {"PATH": os.environ["PATH"], **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})}
        echoed = subprocess.run(["bash", "-c", "echo " + value.group(1)], env=env,
                                capture_output=True, text=True, check=True)
        assert echoed.stdout.strip() == workers, (cpus, echoed.stdout)


def test_sbatch_cpu_job_does_not_force_workers() -> None:
    """CPU array tasks ran `--workers $SLURM_CPUS_PER_TASK`, leaving the model one thread."""
    cpu = hpc.slurm_script(["a.svs"], "o", 2, gpus_per_task=0, cpus_per_task=8)
    assert "--workers" not in cpu and "#SBATCH --cpus-per-task=8" in cpu
    gpu = hpc.slurm_script(["a.svs"], "o", 2, gpus_per_task=1, cpus_per_task=8)
    assert "--workers" in gpu.splitlines()[-1]
    tile = hpc.slurm_script(["a.svs"], "o", 2, gpus_per_task=0, command="histotile tile",
                            predict_args=["--limit", "5"])
    assert tile.splitlines()[-1].endswith("-o " + os.path.abspath("o") + " --limit 5")


def test_slurm_script_rejects_bad_sizes() -> None:
    with pytest.raises(Exception, match="array size"):
        hpc.slurm_script(["a"], "o", 0)


def test_cli_script_passes_options_after_dashdash(tmp_path: Path) -> None:
    folder = slide_folder(tmp_path / "in", ["a.svs", "b.svs", "c.svs"])
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["slurm", "script", str(folder), "-o", str(out),
                                   "--gpus-per-task", "0", "--cpus-per-task", "2", "--",
                                   "--model", "x", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    assert "#SBATCH --array=0-2" in res.output  # one task per slide by default
    assert res.output.rstrip().endswith("--model x --batch-size 64")
    assert (out / "logs").is_dir()


def test_submit_without_sbatch_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(hpc.SlurmError, match="sbatch not found") as info:
        hpc.submit("#!/bin/bash\n")
    assert "histotile slurm script" in info.value.hint
    env = {**os.environ, "PATH": str(tmp_path)}
    folder = slide_folder(tmp_path / "in", ["a.svs"])
    proc = subprocess.run([sys.executable, "-m", "histotile", "slurm", "submit", str(folder),
                           "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: sbatch: sbatch not found")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- status

def test_merge_manifests_of_shards_and_status_cli(tmp_path: Path) -> None:
    folder = slide_folder(tmp_path / "in", ["a.svs", "b.svs", "c.svs"], corrupt="bad.svs")
    items, out = expand_inputs([str(folder)]), tmp_path / "out"
    for i in range(3):
        run_batch(items, out, make_probe_process(), {"j": 1}, shard=(i, 3), progress=False)
    rows = hpc.merge_manifests(out)
    assert [Path(r["slide"]).name for r in rows] == ["a.svs", "b.svs", "bad.svs", "c.svs"]
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    table = hpc.status_table(rows)
    assert "done          3" in table and "failed: bad.svs" in table

    # a rerun of one shard is newer: its rows win (skipped now)
    run_batch(items, out, make_probe_process(), {"j": 1}, shard=(0, 3), progress=False)
    assert hpc.merge_manifests(out)[0]["status"] == "skipped"

    res = CliRunner().invoke(cli, ["slurm", "status", str(out), "--write"])
    assert res.exit_code == 0, res.output
    assert "failed: bad.svs" in res.output and (out / "manifest.csv").exists()
    assert len(hpc.merge_manifests(out)) == 4


def test_status_of_an_empty_folder(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["slurm", "status", str(tmp_path)])
    assert res.exit_code == 0 and "no manifest" in res.output


# --------------------------------------------------------------------------- options

def test_batch_options_decorator(monkeypatch) -> None:
    seen: dict = {}

    @click.command()
    @batch_options
    def cmd(**kwargs) -> None:
        seen.update(pop_batch_options(kwargs).run_items_kwargs())
        seen["left"] = kwargs

    args = ["--shard", "1/3", "--executor", "dask-jobqueue", "--jobs", "4", "--overwrite",
            "--cluster-option", "queue=gpu", "--cluster-option", "cores=4",
            "--cluster-option", "job_extra_directives=--gpus-per-task=1"]
    assert CliRunner().invoke(cmd, args).exit_code == 0
    assert seen["shard"] == (1, 3) and seen["executor"] == "dask-jobqueue" and seen["jobs"] == 4
    assert seen["overwrite"] and seen["left"] == {}
    assert seen["cluster_kwargs"] == {"queue": "gpu", "cores": 4,
                                      "job_extra_directives": ["--gpus-per-task=1"]}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert CliRunner().invoke(cmd, []).exit_code == 0
    assert seen["shard"] == (2, 5) and seen["executor"] == "serial"
    assert CliRunner().invoke(cmd, ["--cluster-option", "nokey"]).exit_code != 0


# --------------------------------------------------------------------------- dask (local)

@pytest.mark.slow  # a dask LocalCluster start and stop
def test_local_dask_executor_real_slides(tmp_path: Path) -> None:
    folder = slide_folder(tmp_path / "in", ["a.svs", "b.svs"], corrupt="bad.svs")
    items, out = expand_inputs([str(folder)]), tmp_path / "out"
    summary = hpc.run_with_dask(items, out, make_probe_process, {"j": "dask"}, executor="local",
                                jobs=2, progress=False)
    assert [r.status for r in summary.results] == ["done", "done", "failed"]
    assert summary.exit_code == 1 and summary.manifest == out / "manifest.csv"
    info = json.loads((out / "a" / "info.json").read_text())
    assert (info["width"], info["height"]) == (2220, 2967)
    mtime = (out / "a" / "run.json").stat().st_mtime_ns
    serial = run_items(items, out, make_probe_process, {"j": "dask"}, progress=False)
    assert [r.status for r in serial.results] == ["skipped", "skipped", "failed"]
    assert (out / "a" / "run.json").stat().st_mtime_ns == mtime  # not recomputed


def _failing_factory(reason: str):
    raise RuntimeError(reason)


def test_dask_worker_setup_failure_is_per_item(tmp_path: Path) -> None:
    folder = slide_folder(tmp_path / "in", ["a.svs"])
    summary = run_items(expand_inputs([str(folder)]), tmp_path / "out",
                        partial(_failing_factory, "no model loaded"), {},
                        executor="local", jobs=1, progress=False)
    assert [r.status for r in summary.results] == ["failed"]
    assert summary.results[0].error == "RuntimeError: no model loaded"


def test_tile_on_the_local_dask_executor(tmp_path: Path) -> None:
    """tile's process (files layout) pickles to dask workers and lands like a serial run."""
    import h5py

    import histotile

    folder = slide_folder(tmp_path / "in", ["a.svs", "b.svs"])
    out = tmp_path / "out"
    summary = histotile.tile(folder, out, limit=3, executor="local", jobs=2, progress=False)
    assert [r.status for r in summary.results] == ["done", "done"], summary.table()
    for stem in ("a", "b"):
        with h5py.File(out / f"{stem}.h5") as f:
            assert f["x"].shape == (3, 96, 96, 3)
    again = histotile.tile(folder, out, limit=3, progress=False)
    assert [r.status for r in again.results] == ["skipped", "skipped"]


def test_executor_local_without_hpc_extra_is_one_line(tmp_path: Path, monkeypatch,
                                                      capsys) -> None:
    """``--executor local`` without ``distributed`` installed: one error line naming the extra,
    no ImportError traceback (it was a traceback from the dask pool and the CLI's quiet_dask)."""
    from histotile.cli import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    folder = slide_folder(tmp_path / "in", ["a.svs"])
    with pytest.raises(SystemExit) as exc:
        main(["-q", "tile", str(folder), "-o", str(tmp_path / "out"), "--executor", "local",
              "--limit", "2"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "histotile[hpc]" in lines[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.h5"))
