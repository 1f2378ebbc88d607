"""Start-up cost of ``histotile predict``: process start to the first batch, in fresh processes.

For each model, ``N`` runs of ``python -m histotile -q predict SLIDE --model MODEL`` (each in a
new process, into a new output folder), then one more under ``python -X importtime``. Prints per
model: the median (min–max) wall time and CPU time of the whole command, the median
``first_batch_s`` and ``first_batch_cpu_s`` from ``run.json`` (seconds from the process's own
start to the first batch of probabilities; CPU seconds until then, the steadier figure on a
shared machine), which heavy packages the process imported, and the packages whose imports cost
most (self time summed per top-level package; ``-X importtime`` inflates every figure, so read
them as shares). Also the wall time of ``histotile --help``.

    python bench/startup.py                        # bundled model, sample slide, 5 runs
    python bench/startup.py -n 3 --model pathmnist-smallcnn --model PATH/TO/MODEL_FOLDER
    python bench/startup.py --json out.json        # the figures as JSON too

Runs the histotile of this checkout (from its root, which also goes first on ``PYTHONPATH``:
``python -m`` puts the working folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
HEAVY = ("torch", "torchvision", "zarr", "dask", "skimage", "scipy", "sklearn", "matplotlib",
         "pandas", "cv2", "jsonschema", "numcodecs", "tifffile", "openslide", "safetensors",
         "timm", "h5py")
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _predict_cmd(slide: Path, model: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "histotile", "-q", "predict", str(slide), "--model", model,
            "-o", str(out), *extra]


def _modules_probe(slide: Path, model: str, out: Path, extra: list[str]) -> list[str]:
    """The heavy packages a predict process has imported when it ends."""
    code = ("import sys, runpy\n"
            f"sys.argv = ['histotile', '-q', 'predict', {str(slide)!r}, '--model', {model!r}, "
            f"'-o', {str(out)!r}, *{extra!r}]\n"
            "try:\n    runpy.run_module('histotile', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import json\n"
            f"print('MODULES', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("MODULES "):
            return list(json.loads(line[len("MODULES "):]))
    raise RuntimeError(f"module probe failed: {proc.stderr[-500:]}")


def importtime_top(stderr: str, top: int) -> list[tuple[str, float]]:
    """``-X importtime`` lines → the ``top`` top-level packages by summed self time (s)."""
    per_pkg: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            per_pkg[m.group(4).split(".")[0]] += int(m.group(1)) / 1e6
    return sorted(per_pkg.items(), key=lambda kv: -kv[1])[:top]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(slide: Path, model: str, out: Path, extra: list[str]) -> dict[str, Any]:
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(_predict_cmd(slide, model, out, extra), capture_output=True,
                          text=True, env=_env(), cwd=ROOT, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"predict failed (rc {proc.returncode}): {proc.stderr[-800:]}")
    runs = sorted(out.glob("*/run.json"))
    timings = json.loads(runs[0].read_text())["timings"] if runs else {}
    return {"wall_s": wall, "cpu_s": cpu, "first_batch_s": timings.get("first_batch_s"),
            "first_batch_cpu_s": timings.get("first_batch_cpu_s"), "timings": timings}


def bench_model(slide: Path, model: str, n: int, top: int, extra: list[str],
                scratch: Path) -> dict[str, Any]:
    runs = [run_once(slide, model, scratch / f"run{i}", extra) for i in range(n)]
    walls = [r["wall_s"] for r in runs]
    firsts = [r["first_batch_s"] for r in runs if r["first_batch_s"] is not None]
    first_cpu = [r["first_batch_cpu_s"] for r in runs if r["first_batch_cpu_s"] is not None]
    proc = subprocess.run([sys.executable, "-X", "importtime",
                           *_predict_cmd(slide, model, scratch / "importtime", extra)[1:]],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, check=False)
    return {
        "model": model, "runs": n,
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_min_s": round(min(walls), 3), "wall_max_s": round(max(walls), 3),
        "first_batch_median_s": round(statistics.median(firsts), 3) if firsts else None,
        "first_batch_min_s": round(min(firsts), 3) if firsts else None,
        "first_batch_cpu_median_s": round(statistics.median(first_cpu), 3) if first_cpu else None,
        "cpu_median_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
        "heavy_modules": _modules_probe(slide, model, scratch / "probe", extra),
        "importtime_top_s": [(name, round(s, 3)) for name, s in
                             importtime_top(proc.stderr, top)],
        "last_run_timings": runs[-1]["timings"],
    }


def help_wall(n: int) -> float:
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "histotile", "--help"], capture_output=True,
                       env=_env(), cwd=ROOT, check=True)
        walls.append(time.perf_counter() - t0)
    return round(statistics.median(walls), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", type=Path, default=SAMPLE)
    ap.add_argument("--model", action="append",
                    help="bundled name or model folder (repeatable) [pathmnist-smallcnn]")
    ap.add_argument("-n", "--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="importtime packages to list")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("extra", nargs="*", help="more predict options (after --)")
    args = ap.parse_args(argv)
    models = args.model or ["pathmnist-smallcnn"]
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                               "slide": str(args.slide), "help_wall_s": help_wall(3),
                               "models": []}
    print(f"histotile --help: {results['help_wall_s']:.2f} s (median of 3)")
    with tempfile.TemporaryDirectory(prefix="histotile-startup-") as tmp:
        for i, model in enumerate(models):
            r = bench_model(args.slide, model, args.runs, args.top, args.extra,
                            Path(tmp) / f"m{i}")
            results["models"].append(r)
            print(f"\nmodel {model}: {r['runs']} fresh processes")
            print(f"  wall        median {r['wall_median_s']:.2f} s "
                  f"(min {r['wall_min_s']:.2f}, max {r['wall_max_s']:.2f})")
            print(f"  CPU         median {r['cpu_median_s']:.2f} s (user + sys, whole process)")
            if r["first_batch_median_s"] is not None:
                print(f"  first batch median {r['first_batch_median_s']:.2f} s "
                      f"(min {r['first_batch_min_s']:.2f}) from process start, "
                      f"{r['first_batch_cpu_median_s']:.2f} CPU s")
            print(f"  stages      {r['last_run_timings']}")
            print(f"  heavy modules imported: {', '.join(r['heavy_modules']) or 'none'}")
            print("  -X importtime, self time per package (inflated; shares):")
            for name, s in r["importtime_top_s"]:
                print(f"    {name:<28} {s:6.3f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
