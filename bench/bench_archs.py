"""Architectures on the 1,000-image PathMNIST subset: ACC, AUC and training time, one protocol.

Protocol (the same for every architecture):

* data: ``tests/data/patches/pathmnist_train_first1000.npz`` (28 px, 9 classes);
* a fixed stratified 80/20 split (scikit-learn ``train_test_split``, seed 0) written as a
  MedMNIST-layout npz: 800 ``train_*`` + 200 ``test_*`` images. The 200 test images are never
  seen in training nor used to pick an epoch;
* ``histotile.train`` holds out a stratified 10 % of the 800 (seed 0) to pick the best
  epoch; 720 images train. Recipe: Adam lr 1e-3, batch 32, ``--epochs`` epochs (default 5),
  lr ×0.1 at 50 %/75 %, flips/rot90/HED-jitter augmentation, seed 0, no pretraining;
* XGBoost (``histotile.training.xgboost``) trains on the same 720, early-stops on the same
  80 and is scored on the same 200;
* ACC and macro one-vs-rest AUC on the 200 test images (``histotile.training.metrics``), with the
  bootstrap 95 % CI of the accuracy; training time = wall time of the whole ``train()`` call
  (including the per-epoch validation), each architecture in its own process with
  ``torch.set_num_threads(1)``, two processes at a time (2 cores).

    nice -n 10 python bench/bench_archs.py --out bench/out/archs            # all, 2 at a time
    python bench/bench_archs.py --arch vit --epochs 1 --out /tmp/a          # one, quick
    python bench/bench_archs.py --table bench/out/archs                      # markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the repository's test copy (the same file as in ../shared/data)
DATA = ROOT / "tests" / "data" / "patches" / "pathmnist_train_first1000.npz"
ARCHS = ("smallcnn", "resnet18", "resnet50-attention", "efficientnet-b0", "vit", "xgboost")
# the longest first in the first queue; the rest share the second core
QUEUES = (("resnet50-attention",), ("smallcnn", "vit", "efficientnet-b0", "resnet18", "xgboost"))
CARD = {"smallcnn": "—", "resnet18": "90.7 % / 0.983", "resnet50-attention": "—",
        "efficientnet-b0": "—", "vit": "97.6 % / 0.998", "xgboost": "64.7 % / 0.931"}


def make_split(out: Path, seed: int = 0) -> Path:
    """The fixed 800/200 stratified split of the subset as a MedMNIST-layout npz."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    with np.load(DATA) as npz:
        x, y = npz["train_images"], npz["train_labels"]
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed,
                              stratify=y.reshape(-1))
    path = out / "pathmnist_first1000_split80-20_seed0.npz"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        np.savez(path, train_images=x[np.sort(tr)], train_labels=y[np.sort(tr)],
                 test_images=x[np.sort(te)], test_labels=y[np.sort(te)])
    return path


def run_one(arch: str, out: Path, epochs: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    data = make_split(out)
    folder = out / arch
    t0 = time.perf_counter()
    if arch == "xgboost":
        from histotile.training.xgboost import train_xgboost

        train_xgboost(data, folder, seed=0, val_fraction=0.1, n_jobs=threads, n_boot=1000,
                      progress=False)
    else:
        from histotile import train

        train(data, folder, arch=arch, epochs=epochs, batch_size=32, lr=1e-3, seed=0,
              val_fraction=0.1, device="cpu", progress=False, n_boot=1000, plots=False)
    seconds = time.perf_counter() - t0
    metrics = json.loads((folder / "metrics.json").read_text())
    test = metrics["test"]
    card = json.loads((folder / "model.json").read_text())
    result = {"arch": arch, "epochs": None if arch == "xgboost" else epochs,
              "train_seconds": round(seconds, 1), "accuracy": test["accuracy"],
              "auc": test.get("auc"), "ci95_accuracy": test.get("ci", {}).get("accuracy"),
              "n_test": test.get("n"), "best_epoch": metrics.get("best_epoch"),
              "n_params": _n_params(card, arch), "threads": threads,
              "load_avg_at_end": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"}
    (out / f"result-{arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _n_params(card: dict[str, Any], arch: str) -> int | None:
    if arch == "xgboost":
        return None
    from histotile.models.architectures import build_model

    m = build_model(arch, len(card["classes"]), card["patch_size"],
                    **card["architecture"].get("kwargs", {}))
    return sum(p.numel() for p in m.parameters())


def run_all(out: Path, epochs: int, archs: tuple[str, ...]) -> None:
    """Two queues of subprocesses (one thread each, one queue per core), logs in ``out/logs``."""
    from concurrent.futures import ThreadPoolExecutor

    make_split(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    queues = [[a for a in q if a in archs] for q in QUEUES]
    with ThreadPoolExecutor(len(queues)) as pool:
        list(pool.map(lambda q: [_run_sub(a, out, epochs) for a in q], queues))
    print(table(out))


def _run_sub(arch: str, out: Path, epochs: int) -> int:
    with open(out / "logs" / f"{arch}.log", "wb") as log:
        return subprocess.run([sys.executable, __file__, "--arch", arch, "--epochs", str(epochs),
                               "--out", str(out), "--threads", "1"], stdout=log,
                              stderr=log).returncode


def table(out: Path) -> str:
    rows = ["| model | ACC (95 % CI) | AUC | training time | params | card (ACC / AUC) |",
            "|---|---|---|---|---|---|"]
    for arch in ARCHS:
        f = out / f"result-{arch}.json"
        if not f.exists():
            rows.append(f"| {arch} | not run / not finished | | | | {CARD[arch]} |")
            continue
        r = json.loads(f.read_text())
        ci = r.get("ci95_accuracy")
        ci_s = f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else ""
        params = f"{r['n_params'] / 1e6:.2f} M" if r.get("n_params") else "—"
        auc = f"{r['auc']:.3f}" if r.get("auc") is not None else "—"
        rows.append(f"| {arch} | {100 * r['accuracy']:.1f} %{ci_s} | {auc} | "
                    f"{r['train_seconds'] / 60:.1f} min | {params} | {CARD[arch]} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "archs")
    ap.add_argument("--arch", choices=ARCHS, help="run one architecture in this process")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma list for the full run")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", type=Path, help="print the table of a finished run folder")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
    elif args.arch:
        print(json.dumps(run_one(args.arch, args.out, args.epochs, args.threads), indent=2))
    else:
        run_all(args.out, args.epochs, tuple(a for a in args.archs.split(",") if a))


if __name__ == "__main__":
    main()
