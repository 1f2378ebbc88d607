"""Shared test helpers: where test data is found, and the small builders several test files use.

Data lookup (:func:`real_data`), in this order:

1. ``tests/data/<relpath>``: small real files kept in the repository (see tests/data/README.md);
2. ``generate.GENERATED[relpath]``: files made by code from those (tests/generate.py), once per
   test session, in a temporary folder;
3. ``../shared/data/<relpath>``: an optional extra folder next to the checkout (benchmarks and extra
   cases only: the default test run never needs it).

Nothing here downloads anything: a missing file fails the test with what to do, it never skips.
"""

from __future__ import annotations

import atexit
import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from generate import BLANK_TILES as BLANK_TILES
from generate import GENERATED, pcam_h5
from generate import TISSUE_TILES as TISSUE_TILES

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED_DATA = ROOT.parent / "shared" / "data"

PATHMNIST = "patches/pathmnist_train_first1000.npz"
KAGGLE = "patches/pcam-kaggle"
CMU = "slides/CMU-1-Small-Region.svs"
PATHMNIST_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
# real H&E pair of torchstain's Macenko example (centre crops, see tests/data/README.md)
HE_SOURCE = "images/he-source-torchstain-crop320.png"
HE_TARGET = "images/he-target-torchstain-crop320.png"
# dense H&E: TIAToolbox's stain-normalisation target (centre crop)
HE_REFERENCE = "images/he-target-tiatoolbox-crop384.png"
TILES = TISSUE_TILES + BLANK_TILES

_generated_dir: Path | None = None


def _generated_root() -> Path:
    global _generated_dir
    if _generated_dir is None:
        _generated_dir = Path(tempfile.mkdtemp(prefix="histotile-test-data-"))
        atexit.register(shutil.rmtree, _generated_dir, ignore_errors=True)
    return _generated_dir


def find_data(relpath: str) -> Path | None:
    """Where ``relpath`` is (stored, generated, or in the optional shared folder), or None."""
    relpath = relpath.strip("/")
    stored = DATA / relpath
    if stored.exists():
        return stored
    if relpath in GENERATED:
        dest = _generated_root() / relpath
        return dest if dest.exists() else GENERATED[relpath](dest, DATA)
    shared = SHARED_DATA / relpath
    return shared if shared.exists() else None


def real_data(relpath: str) -> Path:
    """Path of the test file ``relpath`` (see the module docstring); fails when it is nowhere."""
    found = find_data(relpath)
    if found is None:
        pytest.fail(f"test data {relpath!r} is neither in tests/data nor made by tests/generate.py:"
                    " add it there (with its source and licence in tests/data/README.md)",
                    pytrace=False)
    return found


# ----------------------------------------------------------------------------- patches, archives
def kaggle_patches() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 15 real Kaggle PCam patches (96 px) with their labels, in CSV order."""
    from PIL import Image

    folder = real_data(KAGGLE)
    with open(folder / "train_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.asarray(Image.open(folder / "train" / f"{r['id']}.tif").convert("RGB"))
                  for r in rows])
    return x, np.array([int(r["label"]) for r in rows], np.uint8), [r["id"] for r in rows]


write_pcam_h5 = pcam_h5


# ----------------------------------------------------------------------------- models, CLI
def make_untrained_model(folder: Path, patch_size: int = 28, mpp: float = 4.0,
                         classes: list[str] | None = None, stain: str = "macenko",
                         seed: int = 0) -> Path:
    """A GENERATED model folder: freshly initialised smallcnn + a schema-valid card."""
    import torch
    from safetensors.torch import save_file

    from histotile.download import file_digest
    from histotile.models.architectures import build_model
    from histotile.models.card import ClassInfo, ModelCard

    classes = classes or PATHMNIST_CLASSES
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = build_model("smallcnn", len(classes), patch_size)
    weights = folder / "weights.safetensors"
    save_file(module.state_dict(), str(weights))
    colors = [((37 * i) % 256, (91 * i + 60) % 256, (53 * i + 120) % 256)
              for i in range(len(classes))]
    ModelCard(
        name=f"generated-untrained-smallcnn-{patch_size}px", version="0",
        architecture={"name": "smallcnn", "kwargs": {}},
        classes=[ClassInfo(n, c) for n, c in zip(classes, colors, strict=True)],
        patch_size=patch_size, mpp=mpp,
        input={"mean": [0.7, 0.55, 0.7], "std": [0.15, 0.2, 0.15]},
        weights={"file": weights.name, "sha256": file_digest(weights, "sha256"),
                 "format": "safetensors"},
        stain={"method": stain, "reference": None},
        notes="generated for tests: untrained weights",
    ).save(folder)
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``histotile ARGS`` in this process: (exit code, stdout, stderr)."""
    from histotile.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- heatmaps, results
CLASSES = ["tumor", "stroma", "background"]
COLORS = [(200, 0, 0), (0, 160, 0), (30, 30, 200)]


def cmu_grid(slide_path: Path, level: int | None = None) -> dict:
    """The grid predict uses on a real slide: 28 px patches at 4 um/px, Otsu tissue >= 50%
    (or, with ``level``, 32 px patches read at that level, no tissue filter)."""
    from histotile.grid import make_grid
    from histotile.slide import open_slide
    from histotile.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        if level is None:
            grid = make_grid(slide, 28, target_mpp=4.0, tissue=detect_tissue(slide))
        else:
            grid = make_grid(slide, 32, level=level)
        dims = slide.dimensions
    return {"indices": grid.indices, "coords": grid.coords, "grid_shape": grid.grid_shape,
            "dimensions": dims, "attrs": grid.to_attrs()}


def cmu_overlay_inputs(slide_path: Path) -> tuple[dict, np.ndarray, float, float]:
    """What the overlay and export tests draw on: the grid (:func:`cmu_grid`), OpenSlide's
    555 x 742 thumbnail of the real slide, its downsample and the slide's mpp."""
    import openslide

    grid = cmu_grid(slide_path)
    with openslide.OpenSlide(str(slide_path)) as slide:
        thumb = np.asarray(slide.get_thumbnail((555, 742)).convert("RGB"))
        downsample = slide.dimensions[0] / thumb.shape[1]
        mpp = float(slide.properties["openslide.mpp-x"])
    return grid, thumb, downsample, mpp


def generated_probs(n: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), n).astype(np.float32)


def write_heatmap(path: Path, grid: dict, probs: np.ndarray, batch: int = 7) -> Path:
    from histotile.stitch import HeatmapWriter

    with HeatmapWriter(path, grid["grid_shape"], grid["indices"], CLASSES, COLORS,
                       grid["attrs"]) as writer:
        for s in range(0, len(probs), batch):
            writer.write(grid["indices"][s:s + batch], probs[s:s + batch])
    return path


def write_result(folder: Path, grid: dict, probs: np.ndarray, batch: int = 16) -> Path:
    """What predict writes for a slide, batch by batch (see histotile.predict)."""
    from histotile.export.csv import PredictionsCSVWriter
    from histotile.export.qupath import GeoJSONTileWriter
    from histotile.stitch import HeatmapWriter

    folder.mkdir(parents=True, exist_ok=True)
    size = grid["attrs"]["patch_size_level0"]
    with (HeatmapWriter(folder / "heatmap.ome.zarr", grid["grid_shape"], grid["indices"],
                        CLASSES, COLORS, grid["attrs"]) as heat,
          PredictionsCSVWriter(folder / "predictions.csv", CLASSES, size) as table,
          GeoJSONTileWriter(folder / "tiles.geojson.gz", CLASSES, COLORS,
                            id_seed=f"{folder.name}.svs") as tiles):
        for s in range(0, len(probs), batch):
            sl = slice(s, s + batch)
            heat.write(grid["indices"][sl], probs[sl])
            table.write(grid["coords"][sl], probs[sl])
            tiles.write(grid["coords"][sl], probs[sl], size)
    card = {"classes": [{"name": n, "color": list(c)}
                        for n, c in zip(CLASSES, COLORS, strict=True)]}
    run = {"slide": f"/slides/{folder.name}.svs", "model": {"card": card}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def without_slideio(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``[formats]`` extra (slideio: VSI, CZI) were not installed."""
    monkeypatch.setattr("histotile.slide_formats.slideio_installed", lambda: False)
    monkeypatch.setattr("histotile.slide.slideio_installed", lambda: False)
