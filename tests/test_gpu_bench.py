"""bench/gpu.sh: its CPU smoke mode end to end (the table it writes), and its refusal without a
GPU. Speed is never asserted."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu.sh"
ROW_LABELS = ("model alone", "benchmark slide", "folder of 2 small slides")


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _rows(section: str) -> dict[str, list[str]]:
    """Table rows of the section: label -> the other cells."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| measurement", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    assert re.fullmatch(r"\d+(\.\d+)?", cell), f"not a number: {cell!r}"
    return float(cell)


@pytest.mark.slow  # three fresh histotile processes with ResNet-18: ~40 s quiet, ~100 s busy
def test_gpu_bench_smoke_writes_a_dated_table(tmp_path: Path, cmu_small: Path) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nearlier text\n")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "gpu"), "--model-dir",
         str(tmp_path / "model"), "--write", "--benchmarks", str(benchmarks)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env=_env(HISTOTILE_GPU_BENCH_SMOKE="1", HISTOTILE_BENCH_SOURCE=str(cmu_small)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = (tmp_path / "gpu" / "results.md").read_text()
    for key in ("- date: ", "; commit `", "- machine: no GPU", "- command: `bash bench/gpu.sh",
                "batch 16, device cpu"):
        assert key in section, key
    rows = _rows(section)
    for want in ROW_LABELS:
        assert any(label.startswith(want) for label in rows), (want, list(rows))
    for label, cells in rows.items():
        patches, wall, rate, per_hour, busy, rss = cells
        if label.startswith("reader ceiling"):
            continue
        assert _number(patches) > 0 and _number(wall) > 0 and _number(rate) > 0, label
        assert busy == "—", "no GPU: no busy figure, never a made-up one"
        if label.startswith(("benchmark slide", "folder")):
            assert _number(per_hour) > 0 and _number(rss) > 0
            assert _number(rate) == pytest.approx(_number(patches) / _number(wall), rel=0.06)
    folder = next(c for label, c in rows.items() if label.startswith("folder"))
    slides_h = 3600 * 2 / _number(folder[1])
    assert _number(folder[3]) == pytest.approx(slides_h, rel=0.06)
    readers = [label for label in rows if label.startswith("reader ceiling, 1 workers")]
    if (ROOT / "bench" / "pipeline.py").is_file():
        assert readers and _number(rows[readers[0]][2]) > 0
    else:  # said plainly, no row
        assert not readers
        assert "reader ceiling, 1 workers (bench/pipeline.py, null model): not measured: " \
               "bench/pipeline.py not found" in section
    text = benchmarks.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n") and text.endswith(section)


def test_gpu_bench_without_a_gpu_refuses_in_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: this checks the refusal without one")
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0]
    assert not (tmp_path / "gpu").exists()


def test_gpu_busy_is_the_mean_of_nvidia_smi_samples(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pynvml the sampler reads ``nvidia-smi -lms 200`` (a stand-in script here)."""
    import importlib.util
    import sys
    import time

    args_file = tmp_path / "args"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args_file}\necho 40\necho 80\nexec sleep 30\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # "not installed"
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    with gpu.GpuSampler(3) as busy:
        deadline = time.monotonic() + 20
        while len(busy.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert busy.samples == [40.0, 80.0] and busy.mean == 60.0
    assert args_file.read_text().split() == ["--query-gpu=utilization.gpu",
                                             "--format=csv,noheader,nounits", "-lms", "200",
                                             "-i", "3"]
    with gpu.GpuSampler(None) as none:  # no GPU: no figure
        pass
    assert none.mean is None and none.samples == []
