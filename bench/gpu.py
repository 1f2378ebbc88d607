"""The GPU benchmark behind ``bash bench/gpu.sh``: one command, a dated Markdown section.

Measures, on the first CUDA device (or on the CPU with ``--smoke``):

1. **model alone**: ResNet-18 at 96 px (bench/export_model.py) through ``engine.classify`` on
   random pinned uint8 batches, in a fresh process, after a warm-up: patches/s;
2. **benchmark slide**: ``histotile predict`` on the mosaic slide of bench/make_slide.py
   (``--size`` 37,000² gives ~15k patches at predict's tissue rule: 4,036 at 20,000², 39,054
   at 60,000²): wall time of the whole process, slides/h, patches/s;
3. **folder**: ``histotile predict`` on a folder of copies of CMU-1-Small-Region.svs (one
   process, as a cohort runs): slides/h;
4. **reader ceiling**: ``python bench/pipeline.py --slide SLIDE --workers N --device cuda --json
   OUT.json`` (histotile predict with a null model) for each N of ``--reader-workers``.

GPU busy % is sampled every 0.2 s during each measurement (NVML through pynvml when installed,
else ``nvidia-smi --query-gpu=utilization.gpu -lms 200``): the share of time a kernel ran. For
predict runs it covers the whole process (start-up included); for the model alone the timed loop.

    bash bench/gpu.sh                  # ~3-4 min on a GPU node; table in bench/out/gpu/results.md
    bash bench/gpu.sh --write          # ... and append the section to BENCHMARKS.md
    bash bench/gpu.sh --smoke          # the same steps on the CPU, tiny inputs (< 1 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import run as bench_run  # noqa: E402 - bench/run.py: measure, make_folder, machine, git_commit

SMOKE_ENV = "HISTOTILE_GPU_BENCH_SMOKE"
NOT_MEASURED = "—"


# --------------------------------------------------------------------------- GPU busy
class GpuSampler:
    """GPU utilisation (%) sampled every ``interval`` s inside a ``with`` block; ``mean`` is
    None when there is no GPU or no way to read it."""

    def __init__(self, index: int | None, interval: float = 0.2) -> None:
        self.index, self.interval = index, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        if self.index is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self._thread = threading.Thread(target=self._nvml, args=(pynvml, handle),
                                            daemon=True)
        except Exception:  # noqa: BLE001 - no pynvml / no NVML: nvidia-smi below
            smi = shutil.which("nvidia-smi")
            if smi is None:
                return self
            self._proc = subprocess.Popen(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(round(self.interval * 1000)), "-i", str(self.index)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._smi, daemon=True)
        self._thread.start()
        return self

    def _nvml(self, pynvml: Any, handle: Any) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def _smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def gpu_index() -> int:
    """nvidia-smi's index of CUDA device 0 (the first of CUDA_VISIBLE_DEVICES when numeric)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


# --------------------------------------------------------------------------- model alone
def model_alone_worker(model: Path, device: str, batch_size: int, seconds: float,
                       gpu: int | None) -> dict[str, Any]:
    """engine.classify on random batches from a ring of pinned buffers (as predict feeds it)."""
    import numpy as np
    import torch

    from histotile import engine
    from histotile.models.loading import load_model

    dev = torch.device(device)
    loaded = load_model(model, device)
    size = loaded.card.patch_size
    gen = torch.Generator().manual_seed(0)
    ring = [torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=gen)
            for _ in range(engine.batches_in_flight(dev) + 1)]
    if dev.type == "cuda":
        ring = [b.pin_memory() for b in ring]

    def batches(until: float | None, count: int | None = None):
        k = 0
        while (until is None or time.perf_counter() < until) and (count is None or k < count):
            yield np.arange(k * batch_size, (k + 1) * batch_size), ring[k % len(ring)]
            k += 1

    for _ in engine.classify(batches(None, 5), loaded, dev):  # warm-up: cuDNN plans, caches
        pass
    stats = engine.EngineStats()
    with GpuSampler(gpu) as busy:
        t0 = time.perf_counter()
        for _ in engine.classify(batches(t0 + seconds), loaded, dev, stats=stats):
            pass
        wall = time.perf_counter() - t0
    return {"patches": stats.patches, "wall_s": wall, "patches_per_s": stats.patches / wall,
            "gpu_busy": busy.mean}


def model_alone(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "gpu.py"), "--model-alone-worker", str(model),
           "--device", args.device, "--batch-size", str(args.batch_size),
           "--model-seconds", str(args.model_seconds)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return {"error": _last_line(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- predict runs
def predict(args: argparse.Namespace, label: str, inputs: Path, model: Path, slides: int
            ) -> dict[str, Any]:
    """One fresh ``histotile predict`` process over ``inputs``: wall, peak RSS, GPU busy."""
    out = args.out / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "histotile", "--quiet", "predict", str(inputs), "--model",
           str(model), "--out-dir", str(out), "--device", args.device, "--batch-size",
           str(args.batch_size)]
    with GpuSampler(args.gpu) as busy:
        res = bench_run.measure(cmd, {"PYTHONPATH": _pythonpath()},
                                args.out / "logs" / f"{label}.log", timeout_s=args.timeout)
    if res["rc"] != 0:
        return {"error": f"predict failed (rc {res['rc']}), see {res['log']}"}
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    if len(runs) != slides:
        return {"error": f"{len(runs)} of {slides} slides finished, see {res['log']}"}
    patches = sum(int(r["patches"]) for r in runs)
    return {"patches": patches, "slides": slides, "wall_s": res["wall_s"],
            "patches_per_s": patches / res["wall_s"], "slides_per_h": 3600 * slides /
            res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "gpu_busy": busy.mean}


def reader_ceiling(args: argparse.Namespace, slide: Path, workers: int) -> dict[str, Any]:
    """``bench/pipeline.py`` (the null-model pipeline benchmark) with ``workers`` readers."""
    script = HERE / "pipeline.py"
    if not script.is_file():
        return {"error": "bench/pipeline.py not found (the null-model pipeline benchmark): "
                         "the reader ceiling was not measured"}
    out = args.out / f"pipeline-{workers}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--slide", str(slide), "--workers", str(workers),
           "--device", args.device, "--json", str(out)]
    with GpuSampler(args.gpu) as busy:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              check=False, timeout=args.timeout)
        wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"bench/pipeline.py failed (rc {proc.returncode}): "
                         f"{_last_line(proc.stderr or proc.stdout)}"}
    rows = json.loads(out.read_text()).get("results") or [{}]
    row = rows[-1]
    rate = row.get("stream_patches_per_s")
    if rate is None:
        return {"error": f"{out.name} has no stream_patches_per_s (bench/pipeline.py changed?)"}
    return {"patches": row.get("patches"), "wall_s": row.get("wall_s", wall),
            "patches_per_s": float(rate), "gpu_busy": busy.mean, "workers": workers}


# --------------------------------------------------------------------------- inputs
def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, int]:
    """(model folder, benchmark slide, folder of small slides, their count), built if missing."""
    from export_model import export_all
    from make_slide import make_benchmark_slide, source_path

    model_root = args.model_dir
    fmt = "histotile-ts" if args.model_format == "torchscript" else "histotile"
    if not (model_root / fmt / "model.json").is_file():
        export_all(model_root, seed=0)
    slide = args.slide or HERE / "out" / f"bench{args.size // 1000}k.tif"
    if not slide.is_file():
        print(f"building {slide} ({args.size}² px) ...", flush=True)
        make_benchmark_slide(slide, size=args.size, seed=0)
    folder = bench_run.make_folder(args.out, args.folder_slides, source_path())
    return model_root / fmt, slide, folder, args.folder_slides


# --------------------------------------------------------------------------- report
def machine(device: str) -> str:
    cpu = bench_run.machine()
    if device != "cuda":
        return f"no GPU (CPU run); CPU: {cpu}"
    smi = shutil.which("nvidia-smi")
    gpu = "CUDA device (nvidia-smi not found)"
    if smi:
        proc = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader", "-i", str(gpu_index())],
                              capture_output=True, text=True, check=False)
        gpu = proc.stdout.strip() or gpu
    return f"GPU: {gpu}; CPU: {cpu}"


def _fmt(value: Any, digits: int = 1) -> str:
    return NOT_MEASURED if value is None else f"{value:,.{digits}f}".replace(",", "")


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| measurement | patches | wall s | patches/s | slides/h | GPU busy % | "
             "peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for label, r in rows:
        if "error" in r:
            notes.append(f"- {label}: not measured: {r['error']}")
            continue
        lines.append(f"| {label} | {r.get('patches', NOT_MEASURED)} | {_fmt(r.get('wall_s'))} | "
                     f"{_fmt(r.get('patches_per_s'))} | {_fmt(r.get('slides_per_h'))} | "
                     f"{_fmt(r.get('gpu_busy'), 0)} | {_fmt(r.get('peak_rss_mb'), 0)} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def render(header: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    title = "GPU benchmark" if header["device"] == "cuda" else "GPU benchmark, CPU smoke run"
    return "\n".join([
        f"### {title} (`bench/gpu.sh`), {header['date']}", "",
        f"- date: {header['date']}; commit `{header['commit']}`",
        f"- machine: {header['machine']}",
        f"- command: `{header['command']}`",
        f"- model: ResNet-18 (bench/export_model.py, {header['model_format']}), 96 px at 0.972 "
        f"µm/px, batch {header['batch_size']}, device {header['device']}; benchmark slide "
        f"{header['slide']}; GPU busy sampled every 0.2 s ({header['busy_source']}); total "
        f"{header['total_s']:.0f} s", "",
        table(rows), ""])


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": _pythonpath()}


def _last_line(text: str) -> str:
    lines = [s for s in (text or "").strip().splitlines() if s.strip()]
    return lines[-1] if lines else "no output"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", default=bool(os.environ.get(SMOKE_ENV)),
                    help=f"CPU, tiny slide, few patches: checks the script end to end "
                         f"(also ${SMOKE_ENV}=1)")
    ap.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    ap.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--slide", type=Path, default=None,
                    help="benchmark slide [default: bench/out/bench37k.tif, built if missing]")
    ap.add_argument("--size", type=int, default=37000, help="side of a slide built here")
    ap.add_argument("--folder-slides", type=int, default=20)
    ap.add_argument("--reader-workers", default=None,
                    help="comma-separated reader counts [default: cpus/2, cpus-1]")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--model-seconds", type=float, default=15.0)
    ap.add_argument("--model-format", choices=("torchscript", "safetensors"),
                    default="torchscript")
    ap.add_argument("--model-dir", type=Path, default=HERE / "out" / "model")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "gpu")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-alone-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.folder_slides = min(args.size, 1024), min(args.folder_slides, 2)
        args.batch_size, args.model_seconds = min(args.batch_size, 16), min(args.model_seconds, 1)
        args.reader_workers = args.reader_workers or "1"
        args.device = "cpu"
        if args.slide is None:
            args.slide = args.out / f"smoke{args.size}.tif"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    args.reader_workers = sorted({int(w) for w in (
        args.reader_workers or f"{max(1, cpus // 2)},{max(1, cpus - 1)}").split(",")})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_alone_worker is not None:  # the fresh process of model_alone()
        gpu = gpu_index() if args.device == "cuda" else None
        print(json.dumps(model_alone_worker(args.model_alone_worker, args.device,
                                            args.batch_size, args.model_seconds, gpu)))
        return 0
    if args.device is None:
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); run it on "
                  "a GPU node, or `bash bench/gpu.sh --smoke` for the CPU dry run",
                  file=sys.stderr)
            return 2
        args.device = "cuda"
    args.gpu = gpu_index() if args.device == "cuda" else None
    args.out, args.model_dir = args.out.resolve(), args.model_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, slide, folder, n_small = prepare(args)
    with GpuSampler(args.gpu) as probe:
        time.sleep(0.5)
    dims = "×".join(str(d) for d in bench_run.slide_facts(slide)["dimensions"])
    header = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": bench_run.git_commit(), "machine": machine(args.device),
              "command": "bash bench/gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv),
              "model_format": args.model_format, "batch_size": args.batch_size,
              "device": args.device,
              "slide": f"{slide.name} ({dims} px)",
              "busy_source": "NVML/nvidia-smi" if probe.samples else "not available"}
    rows: list[tuple[str, dict[str, Any]]] = []

    def step(label: str, result: dict[str, Any]) -> None:
        rows.append((label, result))
        print(f"{label}: {result}", flush=True)

    step("model alone (engine.classify, random batches)", model_alone(args, model))
    step(f"benchmark slide {slide.name}", predict(args, "slide", slide, model, 1))
    step(f"folder of {n_small} small slides (CMU-1-Small-Region copies)",
         predict(args, "folder", folder, model, n_small))
    for n in args.reader_workers:
        step(f"reader ceiling, {n} workers (bench/pipeline.py, null model)",
             reader_ceiling(args, slide, n))
    header["total_s"] = time.perf_counter() - t_start
    section = render(header, rows)
    (args.out / "results.md").write_text(section)
    (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows},
                                                      indent=1) + "\n")
    print("\n" + section)
    if args.write:
        with open(args.benchmarks, "a") as fh:
            fh.write("\n" + section)
        print(f"appended to {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
