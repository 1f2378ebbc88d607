"""Benchmark the cost of Grad-CAM: patches/s without CAM, with histotile's batched Grad-CAM and
with the grad-cam package's (``pytorch_grad_cam.GradCAM``) batched call, same model and batch.

Models: smallcnn on 28 px PathMNIST patches and resnet18 on 96 px Kaggle PCam patches (both
``histotile.models.architectures.build_model``, seeded random weights: speed does not depend on
training). Patches are real (``tests/data/patches``), repeated to fill a batch. CPU always,
CUDA too when available. Each figure is the median of ``--runs`` rounds after a warm-up round;
the variants take turns within a round (fair under changing load).

    nice python bench/bench_gradcam.py             # full run, prints a markdown table
    python bench/bench_gradcam.py --quick          # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "patches"  # the same files as ../shared/data/patches


def real_patches(kind: str) -> np.ndarray:
    if kind == "pathmnist":
        with np.load(DATA / "pathmnist_train_first1000.npz") as z:
            return z["train_images"]
    from PIL import Image

    folder = DATA / "pcam-kaggle"
    with open(folder / "train_labels.csv", newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    return np.stack([np.asarray(Image.open(folder / "train" / f"{i}.tif").convert("RGB"))
                     for i in ids])


def batch_of(x: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    reps = np.resize(np.arange(len(x)), n)
    t = torch.from_numpy(x[reps]).permute(0, 3, 1, 2).float().div(255)
    return ((t - 0.5) / 0.25).to(device).contiguous(memory_format=torch.channels_last)


def timed(fns: dict[str, Callable[[], object]], runs: int, device: torch.device
          ) -> dict[str, float]:
    """Median seconds per function over ``runs`` rounds after one warm-up round; the functions
    take turns within each round, so load swings on a shared machine hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(runs + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_case(arch: str, data: str, batch: int, runs: int, device: torch.device
               ) -> dict[str, object]:
    from pytorch_grad_cam import GradCAM as LibraryCAM

    from histotile.gradcam import GradCAM
    from histotile.models.architectures import build_model, default_cam_layer

    torch.manual_seed(0)
    x_np = real_patches(data)
    classes = 9 if data == "pathmnist" else 2
    model = build_model(arch, classes, x_np.shape[1]).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    x = batch_of(x_np, batch, device)
    layer = default_cam_layer(arch)
    ours = GradCAM(model, layer)
    lib = LibraryCAM(model, [model.get_submodule(layer)])

    def plain() -> None:
        with torch.inference_mode():
            torch.softmax(model(x), 1).cpu()

    def histotile_cam() -> None:
        cams, probs = ours(x)  # min-max maps at patch size, as the library returns
        cams.cpu(), probs.cpu()

    def histotile_raw() -> None:
        cams, probs = ours(x, normalise="none", size=0)  # what the slide stitcher takes
        cams.cpu(), probs.cpu()

    def library_cam() -> None:
        lib(x, targets=None)

    out: dict[str, object] = {"arch": arch, "patch": int(x_np.shape[1]), "batch": batch,
                              "device": device.type}
    fns = {"no_cam": plain, "histotile": histotile_cam, "histotile_raw": histotile_raw,
           "grad_cam_pkg": library_cam}
    for name, seconds in timed(fns, runs, device).items():
        out[name] = round(batch / seconds, 1)
    lib.activations_and_grads.release()
    return out


def table(rows: list[dict[str, object]]) -> str:
    head = ("| model | patch | device | batch | no CAM | histotile Grad-CAM | "
            "histotile raw (stitching) | grad-cam pkg | histotile / pkg | CAM cost vs no CAM |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['patch']} px | {r['device']} | {r['batch']} | {r['no_cam']} | "
            f"{r['histotile']} | {r['histotile_raw']} | {r['grad_cam_pkg']} | "
            f"{r['histotile'] / r['grad_cam_pkg']:.2f}x | "
            f"{r['no_cam'] / r['histotile']:.1f}x slower |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny batches, 1 run: a smoke test")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = 1 if args.quick else max(3, args.runs)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    rows = []
    for device in devices:
        big = device.type == "cuda"
        cases = [("smallcnn", "pathmnist", 8 if args.quick else (1024 if big else 256)),
                 ("resnet18", "pcam", 4 if args.quick else (256 if big else 64))]
        for arch, data, batch in cases:
            rows.append(bench_case(arch, data, batch, runs, device))
            print(json.dumps(rows[-1]), file=sys.stderr)
    now = dt.datetime.now(dt.timezone.utc)
    print(f"date: {now:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; median of {runs} runs")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
