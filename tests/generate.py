"""Test data made by code, from the real files in ``tests/data`` or from nothing.

Every function writes one file (or folder) deterministically and returns its path; the tests reach
them through :func:`helpers.real_data` under a relative path (``GENERATED``), the same way as the
stored files. Nothing here downloads anything. What each file is:

- ``slides/boxes-synthetic.tiff``: SYNTHETIC generic tiled TIFF, three coloured boxes, 300x250 px,
  4 levels (the third has a non-integer downsample), deflate, 64 px tiles, 72 dpi resolution tags
  (352.8 um/px): the layout of openslide-python's ``boxes.tiff`` fixture, drawn here.
- ``tiles/*.png``: 512 px crops of the real CC0 slide ``CMU-1-Small-Region.svs``: ``tissue-*`` are
  mostly tissue, ``no-tissue*`` / ``almost-white-*`` are glass (one with a speck of debris).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

CMU = "slides/CMU-1-Small-Region.svs"

# name -> (x, y, downsample) of a 512 px tile at level 0 of CMU-1-Small-Region.svs (2220x2967)
TILE_CROPS: dict[str, tuple[int, int, int]] = {
    "tissue-cmu-1024-768.png": (1024, 768, 1),
    "tissue-cmu-768-1792.png": (768, 1792, 1),
    "tissue-cmu-1024-2048.png": (1024, 2048, 1),
    "tissue-cmu-ds2-640-1024.png": (640, 1024, 2),
    "no-tissue-cmu-0-512.png": (0, 512, 1),
    "no-tissue-cmu-0-1280.png": (0, 1280, 1),
    "almost-white-cmu-64-1920.png": (64, 1920, 1),  # no stained pixel at all (Macenko: none)
    "almost-white-cmu-1708-256.png": (1708, 256, 1),
}
TISSUE_TILES = [f"tiles/{n}" for n in TILE_CROPS if n.startswith("tissue-")]
BLANK_TILES = [f"tiles/{n}" for n in TILE_CROPS if not n.startswith("tissue-")]


def cmu_region(svs: Path, x: int, y: int, size: int, downsample: int = 1) -> np.ndarray:
    """``size`` px RGB of the slide at level 0 from (x, y), box-downsampled by ``downsample``."""
    import openslide
    from PIL import Image

    side = size * downsample
    with openslide.OpenSlide(str(svs)) as slide:
        img = slide.read_region((x, y), 0, (side, side)).convert("RGB")
    if downsample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img)


def boxes_tiff(dest: Path, data: Path) -> Path:
    """The SYNTHETIC 4-level generic TIFF (see the module docstring)."""
    import tifffile
    from PIL import Image

    del data  # drawn, not derived
    base = np.full((250, 300, 3), 255, np.uint8)
    base[30:136, 31:183] = (255, 0, 0)
    base[94:225, 150:272] = (0, 255, 0)
    base[72:205, 67:204] = (0, 0, 255)
    dest.parent.mkdir(parents=True, exist_ok=True)
    px_per_cm = 72 / 2.54
    with tifffile.TiffWriter(dest) as tw:
        size = (300, 250)
        for k in range(4):
            img = base if k == 0 else np.asarray(
                Image.fromarray(base).resize(size, Image.Resampling.BOX))
            tw.write(img, tile=(64, 64), compression="deflate", photometric="rgb",
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0)
            size = (size[0] // 2, size[1] // 2)
    return dest


def cmu_tile(name: str) -> Callable[[Path, Path], Path]:
    """A maker for one 512 px crop in :data:`TILE_CROPS`."""

    def make(dest: Path, data: Path) -> Path:
        from PIL import Image

        x, y, ds = TILE_CROPS[name]
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cmu_region(data / CMU, x, y, 512, ds)).save(dest)
        return dest

    return make


def pcam_h5(folder: Path, split: str, x: np.ndarray, y: np.ndarray) -> Path:
    """A DERIVED PCam-layout pair (x uint8 (N,96,96,3), y uint8 (N,1,1,1)) from real patches."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    xp = folder / f"camelyonpatch_level_2_split_{split}_x.h5"
    with h5py.File(xp, "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 96, 96, 3))
        f.attrs["note"] = "derived from 15 real Kaggle PCam patches for tests"
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(-1, 1, 1, 1))
    return xp


# relative path (as under tests/data) -> maker(dest, tests/data folder)
GENERATED: dict[str, Callable[[Path, Path], Path]] = {
    "slides/boxes-synthetic.tiff": boxes_tiff,
    **{f"tiles/{name}": cmu_tile(name) for name in TILE_CROPS},
}
