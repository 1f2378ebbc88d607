"""Whole-slide predict: histotile vs WSInfer vs TIAToolbox, same slide, same model.

Each run is a fresh subprocess (imports included, as a user sees it), measured for wall time and
peak memory of its whole process tree (psutil polling: sum of RSS, and of PSS which counts
shared pages once). Tools run in alternation (h, w, t, h, w, t, ...) after one untimed warm-up
each, and the table gives medians: on a noisy machine compare the ratios, not absolute times.

TIAToolbox gets a mask marking exactly WSInfer's patch centres (its own auto mask keeps every
patch touching tissue), so both anchors classify the same patches; histotile uses its own
tissue detection (Otsu, ≥ 50 % tissue per patch). Patch counts are reported for all three.

    python bench/run.py                      # 20k benchmark slide (built if missing), 3 runs
    python bench/run.py --slide S.tif --runs 5 --tools histotile,wsinfer
    python bench/run.py --quick              # 2048² slide, 1 run, no warm-up (smoke test)
    python bench/run.py --folder 20 --tools histotile,wsinfer   # a cohort: 20 copies of the
                                             # CMU sample slide in one folder, one process each
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import anchors  # noqa: E402

ROOT = HERE.parent
TOOLS = ("histotile", "wsinfer", "tiatoolbox")
STAGES = ("open", "tissue", "stain", "read", "model", "stitch", "export")


# --------------------------------------------------------------------------- measuring
def _tree_memory(procs: list[Any], full: bool) -> tuple[int, int, int]:
    """(sum RSS, sum PSS, max single RSS) in bytes; PSS only when ``full`` (reads smaps)."""
    import psutil

    rss = pss = one = 0
    for p in procs:
        try:
            info = p.memory_full_info() if full else p.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        one = max(one, info.rss)
    return rss, pss, one


def measure(cmd: list[str], env: dict[str, str], log: Path, poll_s: float = 0.2,
            timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds and peak RSS/PSS (MB) summed over its process tree.

    RSS is polled every ``poll_s``; the process tree and PSS (which reads smaps) once a
    second, to keep the poller's own CPU use small on a 2-core machine.
    """
    import psutil

    full_env = {**os.environ, **env}
    peak_rss = peak_pss = peak_one = 0
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                cwd=ROOT)
        root = psutil.Process(proc.pid)
        procs: list[Any] = [root]
        tick = 0
        while proc.poll() is None:
            full = tick % max(1, round(1.0 / poll_s)) == 0
            if full:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    procs = [root]
            rss, pss, one = _tree_memory(procs, full)
            peak_rss, peak_one = max(peak_rss, rss), max(peak_one, one)
            if full:
                peak_pss = max(peak_pss, pss)
            if timeout_s and time.perf_counter() - t0 > timeout_s:
                proc.kill()
            tick += 1
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    mb = 1024 * 1024
    return {"wall_s": wall, "rc": proc.returncode, "peak_rss_mb": peak_rss / mb,
            "peak_pss_mb": peak_pss / mb, "peak_rss_one_mb": peak_one / mb, "log": str(log)}


# --------------------------------------------------------------------------- tools
def histotile_run(slide: Path, model_dir: Path, out: Path, batch_size: int,
                  workers: int | None, model_format: str, extra: str = "") -> anchors.ToolRun:
    """``histotile predict`` on ``slide`` (a slide, or a folder of slides: one process)."""
    folder = model_dir / ("histotile-ts" if model_format == "torchscript" else "histotile")
    cmd = [sys.executable, "-m", "histotile", "--quiet", "predict", str(slide),
           "--model", str(folder), "--out-dir", str(out), "--device", "cpu",
           "--batch-size", str(batch_size)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return anchors.ToolRun("histotile", cmd + shlex.split(extra), out)


def histotile_result(out: Path, slide: Path) -> dict[str, Any]:
    """Patches and stage timings from histotile's run.json (a folder: summed over slides)."""
    runs = ([json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
            if slide.is_dir() else [json.loads((out / slide.stem / "run.json").read_text())])
    timings: dict[str, float] = {}
    engine: dict[str, float] = {}
    for run in runs:
        for k, v in run.get("timings", {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
        for k, v in run.get("engine", {}).items():
            if isinstance(v, (int, float)):
                engine[k] = engine.get(k, 0.0) + float(v)
    return {"patches": sum(int(r["patches"]) for r in runs), "timings": timings,
            "engine": engine, "slides": len(runs),
            "effective_mpp": runs[0].get("mpp", {}).get("effective_mpp") if runs else None}


def make_folder(out: Path, count: int, source: Path) -> Path:
    """``count`` copies of ``source`` in ``out/folder<count>/`` (slide-01.svs, ...): a cohort
    of small slides every tool reads as a folder."""
    folder = out / f"folder{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        dest = folder / f"slide-{i:02d}{source.suffix}"
        if not dest.is_file() or dest.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, dest)
    return folder


def build_run(tool: str, args: argparse.Namespace, out: Path, mask: Path | None
              ) -> anchors.ToolRun:
    if tool == "histotile":
        return histotile_run(args.slide, args.model_dir, out, args.batch_size,
                             args.histotile_workers, args.histotile_model, args.histotile_args)
    if tool == "wsinfer":
        return anchors.wsinfer_run(args.slide, args.model_dir, out, args.batch_size,
                                   args.wsinfer_workers)
    return anchors.tiatoolbox_run(args.slide, args.model_dir, out, args.batch_size,
                                  args.tiatoolbox_workers, mask, wsinfer_mpp(args))


def patches_of(tool: str, out: Path, slide: Path) -> dict[str, Any]:
    if tool == "histotile":
        return histotile_result(out, slide)
    if tool == "wsinfer":
        return {"patches": anchors.wsinfer_patches(out)}
    return {"patches": anchors.tiatoolbox_patches(out)}


def wsinfer_mpp(args: argparse.Namespace) -> float:
    """WSInfer's effective grid: round(P × model_mpp / slide_mpp) level-0 px resized to P."""
    card = json.loads((args.model_dir / "histotile" / "model.json").read_text())
    size, mpp = card["patch_size"], card["mpp"]
    level0 = round(size * mpp / args.slide_mpp)
    return level0 * args.slide_mpp / size


def slide_facts(slide: Path) -> dict[str, Any]:
    """Size, levels, mpp and vendor of ``slide`` (a folder: of its first slide, and the count)."""
    import openslide

    slides = sorted(p for p in slide.iterdir() if p.is_file()) if slide.is_dir() else [slide]
    with openslide.OpenSlide(str(slides[0])) as s:
        return {"dimensions": list(s.dimensions), "levels": s.level_count,
                "slide_name": slides[0].name,
                "mpp": float(s.properties.get("openslide.mpp-x", "nan")),
                "vendor": s.properties.get("openslide.vendor"), "slides": len(slides)}


# --------------------------------------------------------------------------- model alone
def model_alone(model_dir: Path, batch_size: int, seconds: float = 8.0) -> dict[str, Any]:
    """ResNet-18 forward (histotile's preprocess) on random 96 px uint8 batches, in a fresh
    process, two ways: one pass at a time with all torch threads (how the anchors run it) and
    histotile's CPU plan (``engine.compute_plan``: concurrent single-threaded streams). Also
    the time a fresh process takes to import torch and load the weights."""
    code = f"""
import json, threading, time, torch
t0 = time.perf_counter()
from histotile.engine import compute_plan
from histotile.models.loading import load_model, preprocess
m = load_model({str(model_dir / 'histotile')!r}, 'cpu')
startup_in_process = time.perf_counter() - t0
card = m.card
x = torch.randint(0, 256, ({batch_size}, card.patch_size, card.patch_size, 3), dtype=torch.uint8,
                  generator=torch.Generator().manual_seed(0))

def run(streams, threads):
    counts = []
    def stream():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            m.module(preprocess(x, card))
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < {seconds} or n < 2 * {batch_size}:
                m.module(preprocess(x, card)); n += {batch_size}
            counts.append(n / (time.perf_counter() - t))
    ts = [threading.Thread(target=stream) for _ in range(streams)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return sum(counts)

plan = compute_plan(torch.device('cpu'), 0)
cores = torch.get_num_threads()
one = run(1, cores)
best = run(plan.streams, plan.threads)
print(json.dumps({{"patches_per_s": max(one, best), "one_stream_per_s": one,
                  "plan_per_s": best, "plan": [plan.streams, plan.threads], "threads": cores,
                  "startup_in_process_s": startup_in_process}}))
"""
    t0 = time.perf_counter()
    bare = subprocess.run([sys.executable, "-c", "import histotile.cli"], cwd=ROOT, check=False)
    bare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load = subprocess.run([sys.executable, "-c", code.split("card = m.card")[0]], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    startup_s = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode != 0 or load.returncode != 0 or bare.returncode != 0:
        err = (out.stderr or load.stderr or "failed").strip().splitlines()
        return {"error": err[-1] if err else "failed"}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(startup_s=startup_s, bare_start_s=bare_s)
    return res


# --------------------------------------------------------------------------- setup
def prepare(args: argparse.Namespace) -> None:
    """Benchmark slide (or folder) and exported model, built when missing."""
    if args.folder:
        from make_slide import source_path

        args.slide = make_folder(args.out, args.folder, args.folder_source or source_path())
    elif not args.slide.is_file():
        from make_slide import make_benchmark_slide

        print(f"building {args.slide} ({args.size}² px, seed {args.seed}) ...", flush=True)
        make_benchmark_slide(args.slide, size=args.size, seed=args.seed)
    if not (args.model_dir / "histotile" / "model.json").is_file():
        from export_model import export_all

        export_all(args.model_dir, seed=args.seed)
    facts = slide_facts(args.slide)
    args.slide_facts = facts
    args.slide_mpp = facts["mpp"]


def choose_tools(args: argparse.Namespace) -> list[str]:
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(wanted) - set(TOOLS)
    if unknown:
        sys.exit(f"unknown tools: {', '.join(sorted(unknown))} (choose from {', '.join(TOOLS)})")
    tools = []
    for t in wanted:
        if t == "tiatoolbox" and args.folder:
            print("note: tiatoolbox skipped in --folder mode (its runner takes one slide)")
            continue
        if t != "histotile" and not anchors.available(t):
            print(f"note: {t} skipped: no virtualenv at {anchors.venv_python(t).parent.parent} "
                  "(bash bench/anchors.sh install)")
            continue
        tools.append(t)
    return tools


def tia_mask(args: argparse.Namespace, tools: list[str], out: Path) -> Path | None:
    """WSInfer's patch centres as a TIAToolbox mask (from a WSInfer run; None: auto mask)."""
    if "tiatoolbox" not in tools or args.tia_mask == "auto":
        return None
    if not anchors.available("wsinfer"):
        print("note: no WSInfer: TIAToolbox uses its own auto tissue mask (counts will differ)")
        return None
    ref = out / "wsinfer-reference"
    if not (ref / "patches").is_dir():
        print("reference WSInfer run for the TIAToolbox mask ...", flush=True)
        run = anchors.wsinfer_run(args.slide, args.model_dir, ref, args.batch_size,
                                  args.wsinfer_workers)
        res = measure(run.cmd, run.env, out / "logs" / "wsinfer-reference.log")
        if res["rc"] != 0:
            sys.exit(f"WSInfer reference run failed, see {res['log']}")
    coords, size = anchors.wsinfer_coords(ref)
    return anchors.centre_mask(coords, size, tuple(args.slide_facts["dimensions"]),
                               out / "tiatoolbox-mask.png")


# --------------------------------------------------------------------------- main loop
def run_all(args: argparse.Namespace, tools: list[str], mask: Path | None
            ) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    schedule = [(-1 - w, t) for w in range(args.warmup) for t in tools]
    schedule += [(r, t) for r in range(args.runs) for t in tools]
    for r, tool in schedule:
        label = f"warm-up {-r}" if r < 0 else f"run {r + 1}/{args.runs}"
        out = args.out / "runs" / f"{tool}-{'w' if r < 0 else ''}{abs(r) if r < 0 else r + 1}"
        shutil.rmtree(out, ignore_errors=True)
        run = build_run(tool, args, out, mask)
        res = measure(run.cmd, run.env, args.out / "logs" / f"{out.name}.log",
                      timeout_s=args.timeout)
        if res["rc"] != 0:
            print(f"  {tool:10s} {label}: FAILED rc={res['rc']} (see {res['log']})", flush=True)
            continue
        res.update(patches_of(tool, out, args.slide))
        print(f"  {tool:10s} {label}: {res['wall_s']:7.1f} s  {res['patches']:6d} patches  "
              f"RSS {res['peak_rss_mb']:6.0f} MB  PSS {res['peak_pss_mb']:6.0f} MB", flush=True)
        if r >= 0:
            results[tool].append(res)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        if r >= 0 and tool == tools[-1] and not args.no_model_alone:
            alone = model_alone(args.model_dir, args.batch_size, args.model_alone_seconds)
            results.setdefault("model-alone", []).append(alone)
            print(f"  model alone  {label}: {alone.get('patches_per_s', float('nan')):.1f} "
                  f"patches/s (one pass at a time {alone.get('one_stream_per_s', 0):.1f}); "
                  f"import + load {alone.get('startup_s', 0):.1f} s", flush=True)
    return results


def median_model_alone(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    runs = [r for r in results.pop("model-alone", []) if "patches_per_s" in r]
    if not runs:
        return {}
    keys = ("patches_per_s", "one_stream_per_s", "plan_per_s", "startup_s", "bare_start_s")
    med = {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}
    return {**med, "threads": runs[0]["threads"], "plan": runs[0].get("plan"), "runs": runs}


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for tool, runs in results.items():
        if not runs:
            continue
        walls = [r["wall_s"] for r in runs]
        wall = statistics.median(walls)
        patches = runs[-1]["patches"]
        rows[tool] = {"patches": patches, "wall_s": wall, "min_s": min(walls),
                      "max_s": max(walls), "patches_per_s": patches / wall,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                      "peak_pss_mb": max(r["peak_pss_mb"] for r in runs), "runs": len(runs)}
        if tool == "histotile":
            names = [s for s in STAGES if any(s in r["timings"] for r in runs)]
            names += sorted({s for r in runs for s in r["timings"]} - set(names))
            rows[tool]["stages"] = {s: statistics.median(r["timings"].get(s, 0.0) for r in runs)
                                    for s in names}
            rows[tool]["slides"] = runs[-1].get("slides", 1)
            for key in ("model_load_s", "wait_s"):
                rows[tool][key] = statistics.median(r["engine"].get(key, 0.0) for r in runs)
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    ht = rows.get("histotile")
    lines = ["| tool | patches | wall s (median, min–max) | patches/s | peak RSS MB | "
             "peak PSS MB | histotile / tool (wall) | histotile / tool (s per patch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tool, r in rows.items():
        ratio = per_patch = "—"
        if ht and tool != "histotile":
            ratio = f"{ht['wall_s'] / r['wall_s']:.2f}"
            per_patch = f"{(ht['wall_s'] / ht['patches']) / (r['wall_s'] / r['patches']):.2f}"
        lines.append(f"| {tool} | {r['patches']} | {r['wall_s']:.1f} ({r['min_s']:.1f}–"
                     f"{r['max_s']:.1f}) | {r['patches_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_pss_mb']:.0f} | {ratio} | {per_patch} |")
    return "\n".join(lines)


def stage_table(row: dict[str, Any], alone: dict[str, Any]) -> str:
    """histotile's own stage timings (run.json), and its overhead beyond the model alone."""
    marks = {k: row["stages"][k] for k in ("first_batch_s", "first_batch_cpu_s")
             if k in row["stages"]}
    stages = {k: v for k, v in row["stages"].items() if k not in marks}
    wall = row["wall_s"]
    cohort = row.get("slides", 1) > 1
    lines = ["| histotile stage (run.json" + (", summed over slides" if cohort else "")
             + ") | s (median) | share of wall |", "|---|---:|---:|"]
    for s, sec in stages.items():
        note = " (reader thread, overlaps model)" if s == "read" else ""
        lines.append(f"| {s}{note} | {sec:.2f} | {sec / wall:.0%} |")
    serial = sum(sec for s, sec in stages.items() if s != "read")
    if not cohort:
        lines.append(f"| process start, imports, rest (wall − serial stages) | "
                     f"{wall - serial:.2f} | {(wall - serial) / wall:.0%} |")
    if "first_batch_s" in marks:
        lines.append(f"\nProcess start to the first batch's probabilities: "
                     f"{marks['first_batch_s']:.2f} s wall, "
                     f"{marks.get('first_batch_cpu_s', float('nan')):.2f} s CPU (run.json "
                     "`timings.first_batch_s`, first slide of the process).")
    if cohort:
        lines.append("\nIn a folder the next slide's open, tissue and stain fit and the previous "
                     "slide's export run in background threads beside the model, so the stages "
                     "overlap and do not add up to the wall time.")
    lines.append(f"\nThe model stage includes loading the weights ({row['model_load_s']:.2f} s), "
                 f"and the model waited {row.get('wait_s', 0.0):.2f} s for patches in all; `read` "
                 "runs beside the model (on 2 cores the two share the CPU).")
    if "patches_per_s" in alone:
        pure = row["patches"] / alone["patches_per_s"]
        over = wall - pure
        plan = alone.get("plan") or [1, alone["threads"]]
        lines.append(f"\nModel alone (ResNet-18 forward + histotile preprocess on random 96 px "
                     f"batches, fresh process, measured in the same alternation): "
                     f"{alone['patches_per_s']:.1f} patches/s with histotile's CPU plan "
                     f"({plan[0]} stream(s) × {plan[1]} torch thread(s)); one pass at a time "
                     f"with {alone['threads']} threads: "
                     f"{alone.get('one_stream_per_s', float('nan')):.1f} patches/s. "
                     f"{row['patches']} patches → {pure:.1f} s of pure model time; histotile "
                     f"wall − that = {over:.1f} s non-model overhead "
                     f"({over / pure:.0%} of the model's time).")
        if "startup_s" in alone:
            fixed = alone["startup_s"]
            lines.append(f"\nOf that overhead, {fixed:.1f} s is paid once per process: a fresh "
                         f"interpreter importing torch and loading the weights, "
                         f"then exiting (`import histotile.cli` alone: "
                         f"{alone.get('bare_start_s', float('nan')):.1f} s); the remaining "
                         f"{over - fixed:.1f} s ({(over - fixed) / pure:.0%} of the model's "
                         "time) is per slide: tissue, stain sample, reading beside the model, "
                         "stitching, export.")
    return "\n".join(lines)


def header_lines(header: dict[str, Any], tools: list[str], mask: Path | None) -> str:
    """Date, machine, commit, command and slide, as Markdown bullet lines."""
    dims = "×".join(str(d) for d in header["dimensions"])
    tia = ("TIAToolbox given WSInfer's patch centres as its mask" if mask is not None
           else "TIAToolbox with its own auto mask")
    what = (f"folder of {header['slides']} slides ({Path(header['slide']).name}), each:"
            if header.get("slides", 1) > 1 else "slide:")
    lines = [f"- date: {header['date']}; commit `{header['commit']}`",
             f"- machine: {header['machine']}",
             f"- command: `{header['command']}`",
             f"- {what} {header.get('slide_name', Path(header['slide']).name)}, {dims} px, "
             f"{header['levels']} levels, "
             f"mpp {header['mpp']} ({header['vendor']}); model ResNet-18, 96 px at 0.972 µm/px "
             f"(WSInfer grid {header['wsinfer_effective_mpp']:.5f} µm/px), batch "
             f"{header['batch_size']}"]
    if "tiatoolbox" in tools:
        lines.append(f"- {tia}")
    return "\n".join(lines)


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"load avg {os.getloadavg()[0]:.1f} at start")


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None,
                    help="slide [default: bench/out/bench20k.tif, built if missing]")
    ap.add_argument("--size", type=int, default=20000, help="size of a slide built here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=HERE / "out" / "model",
                    help="export_model.py output (made if missing)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "run")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first")
    ap.add_argument("--batch-size", type=int, default=64, help="same for every tool")
    ap.add_argument("--histotile-workers", type=int, default=None,
                    help="histotile --workers [default: its own]")
    ap.add_argument("--histotile-model", choices=["safetensors", "torchscript"],
                    default="safetensors")
    ap.add_argument("--histotile-args", default="",
                    help="extra histotile predict options, e.g. '--min-tissue 0.2' to tile "
                         "about as many patches as WSInfer")
    ap.add_argument("--folder", type=int, default=0, metavar="N",
                    help="a cohort instead of one slide: N copies of --folder-source in one "
                         "folder (bench/out/.../folderN), each tool run once on the folder")
    ap.add_argument("--folder-source", type=Path, default=None,
                    help="the slide copied for --folder [default: CMU-1-Small-Region.svs]")
    ap.add_argument("--wsinfer-workers", type=int, default=1,
                    help="WSInfer loader workers (≥ 1: 0 crashes at its GeoJSON step)")
    ap.add_argument("--tiatoolbox-workers", type=int, default=0)
    ap.add_argument("--tia-mask", choices=["wsinfer", "auto"], default="wsinfer",
                    help="TIAToolbox patches: WSInfer's centres, or its own auto mask")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--no-model-alone", action="store_true")
    ap.add_argument("--model-alone-seconds", type=float, default=8.0,
                    help="seconds of forward passes per model-alone configuration")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only re-render the report of an earlier results.json")
    ap.add_argument("--quick", action="store_true",
                    help="2048² slide, 1 run, no warm-up: a smoke test of the harness")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 2048)
        args.runs, args.warmup = 1, 0
        args.model_alone_seconds = 0.5
        args.slide = args.slide or HERE / "out" / f"quick{args.size}.tif"
    args.slide = (args.slide or HERE / "out" / "bench20k.tif").resolve()
    args.model_dir = args.model_dir.resolve()
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args)
    tools = choose_tools(args)
    if not tools:
        print("nothing to run")
        return 1
    if args.quick and tools == ["histotile"]:
        print("quick mode: histotile only (anchors not installed or not asked for)")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = {"date": started, "machine": machine(), "commit": git_commit(),
              "command": "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None
                                                            else argv),
              "slide": str(args.slide), **args.slide_facts,
              "wsinfer_effective_mpp": wsinfer_mpp(args), "batch_size": args.batch_size}
    print(json.dumps(header, indent=1))
    mask = tia_mask(args, tools, args.out)
    results = run_all(args, tools, mask)
    alone = median_model_alone(results)
    rows = summarise(results)
    (args.out / "results.json").write_text(json.dumps(
        {"header": header, "rows": rows, "model_alone": alone, "runs": results,
         "mask": str(mask) if mask else None, "tools": tools}, indent=1))
    print("\n" + render(header, rows, alone, tools, mask))
    (args.out / "results.md").write_text(render(header, rows, alone, tools, mask) + "\n")
    failed = [t for t in tools if not results[t]]
    return 1 if failed else 0


def render(header: dict[str, Any], rows: dict[str, dict[str, Any]], alone: dict[str, Any],
           tools: list[str], mask: Path | str | None) -> str:
    """The Markdown report: header lines, the tool table, histotile's stages."""
    text = [table(rows)]
    if "histotile" in rows:
        text.append(stage_table(rows["histotile"], alone))
    elif alone:
        text.append(f"model alone: {alone['patches_per_s']:.1f} patches/s")
    return "\n\n".join([header_lines(header, tools, mask), *text])


def rerender(path: Path) -> int:
    """Re-summarise a results.json (e.g. after changing the report) without running anything."""
    data = json.loads(path.read_text())
    results = data["runs"]
    alone = median_model_alone(results) or data.get("model_alone", {})
    tools = data.get("tools") or [t for t in TOOLS if t in results]
    rows = summarise({t: results[t] for t in tools if t in results})
    print(render(data["header"], rows, alone, tools, data.get("mask", "given")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
