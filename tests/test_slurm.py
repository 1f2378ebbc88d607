"""Against a real single-node SLURM (started by .ci/slurm-up; .ci/run sets HISTOTILE_SLURM=1).

``histotile predict`` (bundled default model, CPU) as an array job over a folder of real slides
(copies of CMU-1-Small-Region.svs) plus one GENERATED corrupt slide; then a resubmission (nothing
recomputed); then predict's own per-slide process on the dask-jobqueue executor on the same
SLURM. Skips with the reason when SLURM is not running here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import real_data

from histotile import hpc, predict

# The per-shard job: `histotile predict` itself (the bundled default model, on the CPU).
JOB_COMMAND = f"{sys.executable} -m histotile predict"
JOB_ARGS: list[str] = ["--device", "cpu"]
EXPECTED_FILE = "predictions.csv"

SLIDES = ["case-01.svs", "case-02.svs", "case-03.svs", "case-04.svs"]
CORRUPT = "case-00-corrupt.svs"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("HISTOTILE_SLURM") != "1",
                       reason="no SLURM here: HISTOTILE_SLURM=1 is set by .ci/run only after "
                              ".ci/slurm-up started one (it needs root and apt-get)"),
]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        pytest.fail("HISTOTILE_SLURM=1 but sbatch/squeue are not on PATH")
    folder = tmp_path_factory.mktemp("slurm") / "slides"
    folder.mkdir()
    src = real_data("slides/CMU-1-Small-Region.svs")
    for name in SLIDES:
        shutil.copyfile(src, folder / name)
    (folder / CORRUPT).write_bytes(b"GENERATED: not a slide\n" * 400)
    return folder


def _submit(slides: Path, out: Path, array_size: int) -> str:
    cmd = [sys.executable, "-m", "histotile", "slurm", "submit", str(slides), "-o", str(out),
           "--array-size", str(array_size), "--gpus-per-task", "0", "--cpus-per-task", "1",
           "--time", "00:10:00", "--command", JOB_COMMAND, "--wait", "--", *JOB_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def test_array_job_real_slurm(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _submit(slides, out, array_size=3)
    logs = sorted(p.name for p in (out / "logs").glob(f"{job}_*.out"))
    assert logs == [f"{job}_{i}.out" for i in range(3)], logs
    shard_manifests = sorted(p.name for p in out.glob("manifest-*-of-3.csv"))
    assert shard_manifests == [f"manifest-{i}-of-3.csv" for i in range(3)], \
        [(p.name, p.read_text()) for p in (out / "logs").iterdir()]

    rows = hpc.merge_manifests(out)
    status = {Path(r["slide"]).name: r for r in rows}
    assert sorted(status) == sorted([*SLIDES, CORRUPT])  # each slide in exactly one shard
    assert status[CORRUPT]["status"] == "failed" and status[CORRUPT]["error"]
    for name in SLIDES:
        assert status[name]["status"] == "done", status[name]
        folder = Path(status[name]["output"])
        assert (folder / EXPECTED_FILE).is_file()
        run = json.loads((folder / "run.json").read_text())
        assert run["status"] == "done" and run["slide"].endswith(name)
    assert not list((out / ".locks").glob("*.lock"))

    # status CLI over the shard manifests
    st = subprocess.run([sys.executable, "-m", "histotile", "slurm", "status", str(out),
                         "--job", job], capture_output=True, text=True, check=True)
    assert "done          4" in st.stdout and "failed: " + CORRUPT in st.stdout

    # resubmit: finished slides are skipped (not recomputed), the corrupt one fails again
    mtimes = {n: (out / n.removesuffix(".svs") / "run.json").stat().st_mtime_ns for n in SLIDES}
    _submit(slides, out, array_size=3)
    again = {Path(r["slide"]).name: r["status"] for r in hpc.merge_manifests(out)}
    assert again == {**dict.fromkeys(SLIDES, "skipped"), CORRUPT: "failed"}
    assert mtimes == {n: (out / n.removesuffix(".svs") / "run.json").stat().st_mtime_ns
                      for n in SLIDES}


def test_dask_jobqueue_on_real_slurm(slides: Path, tmp_path: Path) -> None:
    """predict's own per-slide process (histotile.inference.make_predict_process) on dask workers
    that are SLURM batch jobs."""
    out = tmp_path / "dask"
    summary = predict(slides, out, device="cpu", executor="dask-jobqueue", cluster="slurm",
                      jobs=2, cluster_kwargs={"memory": "2GB", "walltime": "00:10:00"},
                      progress=False)
    by_name = {Path(r.slide).name: r.status for r in summary.results}
    assert by_name == {**dict.fromkeys(SLIDES, "done"), CORRUPT: "failed"}
    for name in SLIDES:
        run = json.loads((out / name.removesuffix(".svs") / "run.json").read_text())
        assert run["status"] == "done" and run["kind"] == "slide" and run["patches"] > 0
        assert (out / name.removesuffix(".svs") / EXPECTED_FILE).is_file()
    # the workers were SLURM batch jobs: sbatch wrote their logs where we asked
    job_logs = list((out / "logs" / "dask").glob("histotile-dask-*.err"))
    assert any("Start worker at" in p.read_text() for p in job_logs), job_logs
