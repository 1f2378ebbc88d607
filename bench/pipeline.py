"""The pipeline's own ceiling: ``histotile predict`` with a model that costs nothing.

A real ``nn.Module`` (global average pooling of the normalised input, then a 3 -> N linear
layer; TorchScript, with the benchmark model's card: 96 px at 0.972 um/px) goes through the
normal predict path, so reading, JPEG decoding, resampling, the stain step, batching,
stitching and writing are all real and the model's own cost is ~0. Each measurement is a fresh
``python -m histotile predict`` process; the table reports, per reader-process count:

- ``stream/s``: patches per second through the streaming part, from the first region asked to
  the last batch written into the heatmap, CSV and GeoJSON (run.json ``engine.stream_s``):
  reading, decoding, resampling, stain, batching, the model and the per-batch writes; the number
  that bounds what a GPU can be fed;
- ``slide/s``: patches per second over the slide's whole wall time (run.json ``seconds``);
- ``cpu ms/p``: CPU milliseconds per patch of the streaming part (this process, all threads,
  plus the reader processes; run.json ``engine.cpu_s``), which a busy machine distorts much
  less than wall times, and ``cpu bound/s`` = cores / that: the stream's rate on this machine
  were it quiet and the work spread over every core (an upper bound, not a measurement);
- ``wall``: the process, start-up (imports) included;
- busy seconds per stage from run.json (``read`` and ``stain`` summed over readers).

    python bench/pipeline.py --slide bench/out/bench20k.tif --workers 0,1,2 --json out.json
    python bench/pipeline.py --slide S.tif --device cuda --workers 1,4,8 --batch-size 256

``--min-tissue 0`` (the default here) keeps every grid patch (11,449 on the 20,000^2 slide), so
the run is long enough to measure; ``--min-tissue 0.5`` is predict's own default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

#: the benchmark model's card fields (bench/export_model.py): patch size, mpp, classes, input
import export_model  # noqa: E402

NULL_NAME = "bench-null-pool"


def write_null_model(folder: Path, classes: int = len(export_model.CLASSES)) -> Path:
    """A TorchScript "pool then linear" model with the benchmark card (``folder`` replaced)."""
    import torch
    from torch import nn

    class NullPool(nn.Module):
        """Mean colour of each patch -> ``classes`` logits: ~0 FLOPs, a real module."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.head = nn.Linear(3, n)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.ts"
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated; TorchScript is a card format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(NullPool(classes).eval()).save(str(weights))
    card = export_model._card(weights, "torchscript", 0)  # noqa: SLF001 - the bench card
    card.update(name=NULL_NAME, architecture={"name": "null-pool", "kwargs": {}},
                description="Benchmark null model: global average pool + linear (3 -> N). "
                            "Measures the pipeline, not a model. Not for diagnosis.",
                notes="bench/pipeline.py")
    (folder / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return folder


def run_once(slide: Path, model: Path, out: Path, workers: int | None, device: str,
             batch_size: int, min_tissue: float, stain_norm: str) -> dict[str, Any]:
    """One fresh ``histotile predict`` process; its wall time and run.json's figures."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "histotile", "predict", str(slide), "--model", str(model),
           "-o", str(out), "--device", device, "--batch-size", str(batch_size),
           "--min-tissue", str(min_tissue), "--stain-norm", stain_norm, "--overwrite"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"predict failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run = json.loads(next(out.glob("*/run.json")).read_text())
    t, eng = run["timings"], run["engine"]
    stream = eng["stream_s"]
    n = int(eng["patches"])
    return {"workers": run["settings"]["workers"], "patches": n, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "cpu_ms_per_patch": round(1e3 * cpu / max(n, 1), 3),
            "stream_cpu_ms_per_patch": round(1e3 * eng["cpu_s"] / max(n, 1), 3),
            "cpu_bound_patches_per_s": round(_cpus() * n / max(eng["cpu_s"], 1e-9), 1),
            "slide_s": run["seconds"], "stream_s": round(stream, 3),
            "stream_patches_per_s": round(n / stream, 1),
            "slide_patches_per_s": round(n / run["seconds"], 1),
            "pixel_reader": run["settings"].get("pixel_reader"),
            "timings": t, "engine": eng}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--workers", default="0,1,2",
                    help="comma-separated reader-process counts; 'default' = predict's own")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--min-tissue", type=float, default=0.0)
    ap.add_argument("--stain-norm", default="none", choices=("none", "macenko"))
    ap.add_argument("--runs", type=int, default=1, help="runs per worker count (best kept)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="where to write the null model (default: a temporary folder)")
    ap.add_argument("--model", default=None,
                    help="run this model instead of the null one (e.g. to choose the CPU "
                         "reader default with a real network)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: no such slide (bench/make_slide.py builds one)")
    counts = [None if w.strip() == "default" else int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="histotile-pipeline-") as tmp:
        model = (Path(args.model) if args.model is not None
                 else write_null_model(args.model_dir or Path(tmp) / "model"))
        rows = []
        for w in counts:
            runs = [run_once(args.slide, model, Path(tmp) / "out", w, args.device,
                             args.batch_size, args.min_tissue, args.stain_norm)
                    for _ in range(max(1, args.runs))]
            best = max(runs, key=lambda r: r["stream_patches_per_s"])
            best["runs"] = [r["stream_patches_per_s"] for r in runs]
            rows.append(best)
            _print_row(best, header=len(rows) == 1)
    result = {"slide": str(args.slide), "model": args.model or NULL_NAME,
              "device": args.device, "batch_size": args.batch_size,
              "min_tissue": args.min_tissue, "stain_norm": args.stain_norm,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _print_row(r: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'workers':>7} {'patches':>7} {'stream/s':>8} {'cpu ms/p':>8} {'cpu bound/s':>11} "
              f"{'slide/s':>7} {'stream s':>8} {'slide s':>7} {'wall s':>6} {'read':>6} "
              f"{'model':>6} {'stitch':>6} {'export':>6} {'tissue':>6}")
    t, e = r["timings"], r["engine"]
    print(f"{r['workers']:>7} {r['patches']:>7} {r['stream_patches_per_s']:>8.0f} "
          f"{r['stream_cpu_ms_per_patch']:>8.3f} {r['cpu_bound_patches_per_s']:>11.0f} "
          f"{r['slide_patches_per_s']:>7.0f} {r['stream_s']:>8.2f} {r['slide_s']:>7.2f} "
          f"{r['wall_s']:>6.1f} {e.get('read_s', 0):>6.2f} {t.get('model', 0):>6.2f} "
          f"{t.get('stitch', 0):>6.2f} {t.get('export', 0):>6.2f} {t.get('tissue', 0):>6.2f}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
