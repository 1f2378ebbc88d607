"""Benchmark Macenko stain normalisation on 96 px patches: torchstain vs histotile.

Prints patches/s (median of ``--runs`` runs) for torchstain numpy and torch (one patch at a time),
histotile per patch (batched fit) and per slide (one fit, batched apply), on CPU and on CUDA when
available, the ratio to torchstain's torch backend, and the normalisation time relative to a
ResNet-18 forward pass (torchvision, random weights, 96 px, same batch) on each device.

    nice python bench/bench_stain.py            # full run
    python bench/bench_stain.py --quick         # smoke run (seconds, no ResNet-18)

Patches are real: 96 px tiles cut from the H&E images under ``images/`` of each data folder
(``tests/data`` first, then ``../shared/data`` when it is there: the same order as the tests) and
from the CMU-1-Small-Region slide (openslide), keeping tiles with >= 50 % stained pixels.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS = (ROOT / "tests" / "data", ROOT.parent / "shared" / "data")
PATCH = 96
HE_SUFFIXES = (".png", ".jpg")


def he_images(folders: list[Path]) -> list[Path]:
    """The H&E images (``images/he-*``) of every folder, in folder order, sorted by name."""
    return [p for folder in folders for p in sorted((folder / "images").glob("he-*"))
            if p.suffix in HE_SUFFIXES]


def find_file(folders: list[Path], relpath: str) -> Path | None:
    """``relpath`` in the first folder that has it."""
    return next((f / relpath for f in folders if (f / relpath).exists()), None)


def _tiles(rgb: np.ndarray, size: int = PATCH) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    return [
        rgb[y : y + size, x : x + size]
        for y in range(0, h - size + 1, size)
        for x in range(0, w - size + 1, size)
    ]


def _stained_fraction(tile: np.ndarray, io: float = 240, beta: float = 0.15) -> float:
    od = -np.log((tile.reshape(-1, 3).astype(np.float64) + 1) / io)
    return float((od >= beta).all(axis=1).mean())


def load_patches(folders: list[Path], limit: int, quick: bool = False,
                 ) -> tuple[np.ndarray, list[str]]:
    """Real 96 px tissue patches (N, 96, 96, 3) uint8 and the sources they came from.

    ``quick``: the first H&E image that gives a tissue patch, no slide.
    """
    from PIL import Image

    tiles: list[np.ndarray] = []
    sources = []
    for path in he_images(folders):
        with Image.open(path) as img:
            found = [t for t in _tiles(np.asarray(img.convert("RGB")))
                     if _stained_fraction(t) >= 0.5]
        if found:
            tiles += found
            sources.append(path.name)
            if quick:
                break
    slide_path = find_file(folders, "slides/CMU-1-Small-Region.svs")
    if slide_path is not None and not quick:
        import openslide

        with openslide.OpenSlide(str(slide_path)) as slide:
            w, h = slide.dimensions
            region = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
        tiles += _tiles(region)
        sources.append(slide_path.name)
    keep = [t for t in tiles if _stained_fraction(t) >= 0.5]
    if not keep:
        sys.exit(f"no real H&E data under {', '.join(map(str, folders))}")
    reps = -(-limit // len(keep))
    return np.ascontiguousarray(np.stack((keep * reps)[:limit])), sources


def median_time(fn: Callable[[], object], runs: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_device(
    device: str, patches: np.ndarray, target: np.ndarray, args: argparse.Namespace
) -> dict[str, float]:
    import torchstain

    from histotile.stain import MacenkoNormalizer, StainReference

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    n = len(patches)
    n_ts = min(n, args.torchstain_patches)
    rates: dict[str, float] = {}
    if device == "cpu":
        ts_np = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        ts_np.fit(target)

        def run_np() -> None:
            for p in patches[:n_ts]:
                ts_np.normalize(p, stains=False)

        rates["torchstain numpy, per patch"] = n_ts / median_time(run_np, args.runs, sync)
    ts_t = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_t.fit(torch.from_numpy(target).permute(2, 0, 1).to(device))
    ts_t.HERef, ts_t.maxCRef = ts_t.HERef.to(device), ts_t.maxCRef.to(device)
    chw = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous().to(device)

    def run_ts() -> None:
        for p in chw[:n_ts]:
            ts_t.normalize(p, stains=False)

    rates["torchstain torch, per patch"] = n_ts / median_time(run_ts, args.runs, sync)

    norm = MacenkoNormalizer(reference=StainReference.from_image(target))
    batch = torch.from_numpy(patches).to(device)  # (B, 96, 96, 3) uint8, as a DataLoader gives
    sample = batch[: args.fit_patches]
    fit = norm.fit(sample)
    rates["histotile per patch (batched)"] = n / median_time(
        lambda: norm.normalize(batch), args.runs, sync
    )
    t_fit = median_time(lambda: norm.fit(sample), args.runs, sync)
    t_apply = median_time(lambda: norm.normalize(batch, fit), args.runs, sync)
    rates["histotile per slide (batched apply)"] = n / t_apply
    rates[f"histotile per slide fit ({len(sample)} patches), s"] = t_fit

    if args.quick:  # the smoke run skips the (slow to import) model
        return rates
    import torchvision

    model = torchvision.models.resnet18(num_classes=9).eval().to(device)
    x = torch.rand(n, 3, PATCH, PATCH, device=device).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        t_model = median_time(lambda: model(x), args.runs, sync)
    rates["resnet18 forward"] = n / t_model
    rates["per-slide normalisation / resnet18 time, %"] = 100 * t_apply / t_model
    rates["per-patch normalisation / resnet18 time, %"] = (
        100 * (n / rates["histotile per patch (batched)"]) / t_model
    )
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run (smoke test)")
    parser.add_argument("--batch", type=int, default=256, help="patches per batch")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--torchstain-patches", type=int, default=128)
    parser.add_argument("--fit-patches", type=int, default=64, help="sample for the per-slide fit")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: library default)")
    parser.add_argument("--data", type=Path, action="append", default=None,
                        help="data folder with images/ (repeatable) [default: tests/data, then "
                             "../shared/data when present]")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.runs, args.torchstain_patches, args.fit_patches = 8, 1, 4, 4
    if args.threads:  # torch's pool and numpy's BLAS pool (threadpoolctl ships with scikit-learn)
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    from PIL import Image

    folders = [f for f in (args.data or DATA_DIRS) if f.is_dir()]
    patches, sources = load_patches(folders, args.batch, args.quick)
    target_path = next((p for p in he_images(folders) if p.name.startswith("he-target-")), None)
    if target_path is None:
        sys.exit(f"no he-target-* image under {', '.join(map(str, folders))}")
    with Image.open(target_path) as img:
        target = np.array(img.convert("RGB"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "patches": f"{len(patches)} x {PATCH} px from {', '.join(sources)}",
        "runs": args.runs,
        "results": {},
    }
    print(
        f"# {report['machine']}, torch {torch.__version__}, {report['patches']}, "
        f"median of {args.runs}"
    )
    for device in devices:
        rates = bench_device(device, patches, target, args)
        report["results"][device] = rates
        base = rates["torchstain torch, per patch"]
        print(f"\n## {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
        for name, value in rates.items():
            if name.endswith((", s", "%")):
                print(f"{name:48s} {value:10.3f}")
            else:
                print(
                    f"{name:48s} {value:10.0f} patches/s  ({value / base:5.1f}x torchstain torch)"
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
