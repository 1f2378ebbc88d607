"""Benchmark tissue detection + patch grid on one slide: what ``predict`` runs before reading.

Prints the median of ``--runs`` runs of detection + grid (``detect_tissue`` then ``make_grid``
at the model's patch size and mpp: 96 px at 0.972 um/px, the bench model) and a per-step
breakdown (thumbnail read, illumination check, threshold, morphology, grid), plus the first
run of the process on its own (it pays the imports, as a one-slide ``predict`` does).

    nice python bench/bench_tissue.py bench/out/bench20k.tif            # 20,000² bench slide
    python bench/bench_tissue.py tests/data/slides/CMU-1-Small-Region.svs --runs 5
    python bench/bench_tissue.py SLIDE --json out.json                  # figures as JSON too

On a shared machine compare versions in one sitting (same load), as ratios of the medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histotile import tissue
from histotile.grid import make_grid
from histotile.slide import open_slide


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def end_to_end(path: Path, patch: int, mpp: float, method: str, min_tissue: float
               ) -> tuple[float, int]:
    """Seconds of ``detect_tissue`` + ``make_grid`` on an open slide, and the patches kept."""
    with open_slide(path) as slide:
        seconds, grid = _timed(lambda: make_grid(
            slide, patch, target_mpp=mpp, tissue=tissue.detect_tissue(slide, method=method),
            min_tissue=min_tissue))
    return seconds, len(grid)


def steps(path: Path, patch: int, mpp: float, method: str, min_tissue: float
          ) -> dict[str, float]:
    """Seconds per step, each timed on its own (the steps ``detect_tissue`` chains)."""
    out: dict[str, float] = {}
    with open_slide(path) as slide:
        out["thumbnail read"], (thumb, ds, mask_mpp) = _timed(
            lambda: tissue.read_mask_thumbnail(slide, tissue.MASK_MPP, []))
        out["illumination"], light = _timed(lambda: tissue.classify_illumination(thumb))
        kind = "otsu-bright" if light.kind == "darkfield" else method
        out["threshold"], (mask, thr) = _timed(lambda: tissue.threshold_rgb(thumb, kind))
        sizes = tissue.morphology_sizes(mask_mpp)
        out["morphology"], mask = _timed(lambda: tissue.clean_mask(mask, *sizes))
        found = tissue.TissueMask(mask=mask, downsample=ds, mpp=mask_mpp, thumbnail=thumb,
                                  method=kind, threshold=thr, illumination=light)
        out["grid"], _ = _timed(lambda: make_grid(slide, patch, target_mpp=mpp, tissue=found,
                                                  min_tissue=min_tissue))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--patch-size", type=int, default=96)
    parser.add_argument("--mpp", type=float, default=0.972)
    parser.add_argument("--method", default="otsu", choices=tissue.METHODS)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    opts = (args.slide, args.patch_size, args.mpp, args.method, args.min_tissue)

    first, patches = end_to_end(*opts)  # pays the imports
    totals = [end_to_end(*opts)[0] for _ in range(args.runs)]
    has_steps = hasattr(tissue, "threshold_rgb")  # older histotile: end to end only
    per_step: dict[str, list[float]] = {}
    for _ in range(args.runs if has_steps else 0):
        for name, seconds in steps(*opts).items():
            per_step.setdefault(name, []).append(seconds)
    medians = {name: statistics.median(v) for name, v in per_step.items()}
    result = {
        "slide": str(args.slide), "patch_size": args.patch_size, "mpp": args.mpp,
        "method": args.method, "min_tissue": args.min_tissue, "patches": patches,
        "runs": args.runs, "first_run_s": round(first, 4),
        "median_s": round(statistics.median(totals), 4),
        "min_s": round(min(totals), 4), "steps_median_s": {k: round(v, 4)
                                                          for k, v in medians.items()},
        "python": platform.python_version(), "machine": platform.machine(),
    }
    print(f"{args.slide.name}: detection + grid ({args.patch_size} px at {args.mpp:g} um/px, "
          f"{patches} patches kept)")
    print(f"  median of {args.runs}: {result['median_s']:.3f} s   (min {result['min_s']:.3f} s; "
          f"first run with imports {first:.3f} s)")
    for name, value in medians.items():
        print(f"  {name:<15} {value * 1000:8.1f} ms")
    if not has_steps:
        print("  (no per-step breakdown: this histotile has no tissue.threshold_rgb)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
