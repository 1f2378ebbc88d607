"""Region reads: OpenSlide vs tiffslide vs histotile's direct tile reader, same regions.

Reads the same tile-aligned regions (the size ``predict`` reads: 2048 level px plus a patch) from
a slide through each library and prints Mpx/s (median of ``--runs`` passes, taken in
alternation) and the ratio to OpenSlide. Pixels are checked equal on the way.

    python bench/bench_read.py bench/out/bench20k.tif
    python bench/bench_read.py ../shared/data/slides/CMU-1-Small-Region.svs --region 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def regions(dims: tuple[int, int], size: int, count: int) -> list[tuple[int, int]]:
    """``count`` region origins on a diagonal-ish lattice inside the slide (deterministic)."""
    w, h = dims
    xs = list(range(0, max(1, w - size), size)) or [0]
    ys = list(range(0, max(1, h - size), size)) or [0]
    grid = [(x, y) for y in ys for x in xs]
    step = max(1, len(grid) // count)
    return grid[::step][:count]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--region", type=int, default=2048 + 187, help="region side in px")
    ap.add_argument("--count", type=int, default=12, help="regions per pass")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)

    from histotile.slide import open_slide

    readers = {"openslide": open_slide(args.slide, backend="openslide"),
               "tiffslide": open_slide(args.slide, backend="tiffslide"),
               "histotile auto": open_slide(args.slide)}
    auto = readers["histotile auto"]
    print(f"{args.slide.name}: {auto.dimensions}, vendor {auto.vendor}, "
          f"auto pixel reader {auto.pixel_reader}")
    size = (args.region, args.region)
    locs = regions(auto.dimensions, args.region, args.count)
    ref = [readers["openslide"].read_region(loc, 0, size) for loc in locs]
    for name, slide in readers.items():
        for loc, want in zip(locs, ref, strict=True):
            if not np.array_equal(slide.read_region(loc, 0, size), want):
                print(f"{name}: pixels differ from OpenSlide at {loc}")
                return 1
    rates: dict[str, list[float]] = {name: [] for name in readers}
    mpx = len(locs) * args.region ** 2 / 1e6
    for _ in range(args.runs):
        for name, slide in readers.items():
            t0 = time.perf_counter()
            for loc in locs:
                slide.read_region(loc, 0, size)
            rates[name].append(mpx / (time.perf_counter() - t0))
    base = statistics.median(rates["openslide"])
    print(f"{len(locs)} regions of {args.region}² px, {args.runs} passes, medians "
          "(pixels identical):")
    print("| reader | Mpx/s | × OpenSlide |\n|---|---:|---:|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {med / base:.2f} |")
    for slide in readers.values():
        slide.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
