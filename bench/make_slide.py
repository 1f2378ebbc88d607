"""Build a large benchmark slide from the real pixels of CMU-1-Small-Region.svs.

The slide is a mosaic of 512 px blocks: tissue blocks are crops of the real H&E slide (random
offsets among its tissue, random 90° rotations and flips, all from the seed), laid out as a few
tissue islands on a near-white background with slight noise, like a scanned section. It is
written as a pyramidal tiled TIFF (JPEG tiles, levels by 4×, mpp 0.5 in the resolution tags so
openslide and tiffslide report it) strip by strip, so memory stays bounded whatever the size.
``--svs`` writes an Aperio-style variant (ImageDescription ``Aperio ...|MPP = 0.5``) that
openslide opens with its aperio driver. Same seed and arguments → the same bytes.

    python bench/make_slide.py OUT.tif --size 20000 [--svs] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the repository's test copy first, then the optional shared data folder next to the checkout
SOURCES = (ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs",
           ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs")
BLOCK = 512  # level-0 px per mosaic block (a multiple of every level's downsample)
MPP = 0.5
APP_MAG = 20
NOISE_BANK = 8  # distinct background noise textures, reused with flips


def source_path() -> Path:
    """The real slide the mosaic is made of (``HISTOTILE_BENCH_SOURCE`` overrides)."""
    env = os.environ.get("HISTOTILE_BENCH_SOURCE")
    candidates = [Path(env)] if env else []
    candidates += [p.resolve() for p in SOURCES]
    for path in candidates:
        if path.is_file():
            return path
    try:  # a clone without ../shared/data: histotile's sample-data cache
        from histotile.sample_data import fetch_by_path

        return Path(fetch_by_path("slides/CMU-1-Small-Region.svs"))
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot be had here"
        raise FileNotFoundError(
            "CMU-1-Small-Region.svs not found; set HISTOTILE_BENCH_SOURCE to its path or run "
            f"'histotile sample-data' (OpenSlide test data Aperio/CMU-1-Small-Region.svs): {exc}"
        ) from None


def _load_source() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(source_path())) as s:
        rgba = np.asarray(s.read_region((0, 0), 0, s.dimensions))
    return np.ascontiguousarray(rgba[..., :3])


class Mosaic:
    """Deterministic block layout + renderer of any level's rows."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.src = _load_source()
        self.nb = math.ceil(size / BLOCK)
        rng = np.random.default_rng(seed)
        self.background = self._background_colour()
        self.noise = self._noise_bank(rng)
        self.layout = self._layout(rng)
        self._rows: dict[tuple[int, int], np.ndarray] = {}

    # ---------------------------------------------------------------- layout
    def _tissue_map(self) -> np.ndarray:
        """Tissue (saturation) map of the source, for picking tissue-rich crops."""
        rgb = self.src.astype(np.int16)
        sat = rgb.max(axis=2) - rgb.min(axis=2)
        return sat > 25

    def _background_colour(self) -> np.ndarray:
        rgb = self.src.reshape(-1, 3)
        sat = rgb.max(axis=1).astype(np.int16) - rgb.min(axis=1)
        bright = rgb[(sat < 10) & (rgb.min(axis=1) > 200)]
        return np.median(bright, axis=0) if len(bright) else np.array([242.0, 242.0, 242.0])

    def _noise_bank(self, rng: np.random.Generator) -> np.ndarray:
        """Slight sensor-like noise: per-pixel grey noise plus a faint per-channel tint."""
        grey = rng.normal(0.0, 1.6, size=(NOISE_BANK, BLOCK, BLOCK, 1))
        tint = rng.normal(0.0, 0.6, size=(NOISE_BANK, BLOCK, BLOCK, 3))
        return (grey + tint).astype(np.float32)

    def _islands(self, rng: np.random.Generator) -> np.ndarray:
        """Block-level tissue mask: a few elliptical islands covering roughly a third."""
        nb = self.nb
        yy, xx = np.mgrid[0:nb, 0:nb] + 0.5
        mask = np.zeros((nb, nb), bool)
        n_islands = max(2, round(nb / 10))
        target = 0.33 * nb * nb
        for _ in range(50):
            cy, cx = rng.uniform(0.2 * nb, 0.8 * nb, size=2)
            ry, rx = rng.uniform(0.08 * nb, 0.22 * nb, size=2)
            theta = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
            n_islands -= 1
            if n_islands <= 0 and mask.sum() >= target:
                break
        return mask

    def _layout(self, rng: np.random.Generator) -> np.ndarray:
        """Per block: (kind, sy, sx, k, flip, bank); kind 1 = tissue crop, 0 = background."""
        tissue = self._tissue_map()
        integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = tissue.shape
        islands = self._islands(rng)
        out = np.zeros((self.nb, self.nb, 6), np.int64)
        for bi in range(self.nb):
            for bj in range(self.nb):
                k, flip, bank = rng.integers(4), rng.integers(2), rng.integers(NOISE_BANK)
                if not islands[bi, bj]:
                    out[bi, bj] = (0, 0, 0, k, flip, bank)
                    continue
                best, best_frac = (0, 0), -1.0
                for _ in range(30):  # rejection sampling of a tissue-rich offset
                    sy, sx = rng.integers(0, h - BLOCK + 1), rng.integers(0, w - BLOCK + 1)
                    frac = (integral[sy + BLOCK, sx + BLOCK] - integral[sy, sx + BLOCK]
                            - integral[sy + BLOCK, sx] + integral[sy, sx]) / BLOCK**2
                    if frac > best_frac:
                        best, best_frac = (int(sy), int(sx)), frac
                    if frac >= 0.6:
                        break
                out[bi, bj] = (1, best[0], best[1], k, flip, bank)
        return out

    # ---------------------------------------------------------------- rendering
    def block(self, bi: int, bj: int, ds: int) -> np.ndarray:
        """Block (bi, bj) at downsample ``ds`` (area mean of its level-0 pixels), uint8."""
        kind, sy, sx, k, flip, bank = self.layout[bi, bj]
        if kind:
            img = self.src[sy:sy + BLOCK, sx:sx + BLOCK].astype(np.float32)
        else:
            img = self.background.astype(np.float32) + self.noise[bank]
        img = np.rot90(img, k)
        if flip:
            img = img[:, ::-1]
        if ds > 1:
            b = BLOCK // ds
            img = img.reshape(b, ds, b, ds, 3).mean(axis=(1, 3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def block_row(self, bi: int, ds: int) -> np.ndarray:
        """All blocks of block-row ``bi`` at downsample ``ds`` side by side (cached: one row)."""
        key = (bi, ds)
        if key not in self._rows:
            self._rows = {k: v for k, v in self._rows.items() if k[1] != ds}
            self._rows[key] = np.concatenate([self.block(bi, bj, ds) for bj in range(self.nb)],
                                             axis=1)
        return self._rows[key]

    def rows(self, y0: int, y1: int, width: int, ds: int) -> np.ndarray:
        """Rows [y0, y1) of the level at downsample ``ds``, ``width`` px wide (padded)."""
        b = BLOCK // ds
        out = np.empty((y1 - y0, width, 3), np.uint8)
        out[:] = np.clip(np.rint(self.background), 0, 255).astype(np.uint8)
        y = y0
        while y < y1:
            bi = y // b
            if bi >= self.nb:
                break
            row = self.block_row(bi, ds)
            take = min(y1, (bi + 1) * b) - y
            w = min(width, row.shape[1])
            out[y - y0:y - y0 + take, :w] = row[y - bi * b:y - bi * b + take, :w]
            y += take
        return out

    def tiles(self, ds: int, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
        """Row-major tiles of the level at downsample ``ds`` (one strip in memory)."""
        h, w = shape
        width = math.ceil(w / tile) * tile
        for ty in range(math.ceil(h / tile)):
            strip = self.rows(ty * tile, (ty + 1) * tile, width, ds)
            for tx in range(width // tile):
                yield strip[:, tx * tile:(tx + 1) * tile]
        self._rows.clear()


def level_downsamples(size: int, tile: int) -> list[int]:
    """Downsamples by 4× until a level fits one tile (at least 3 levels)."""
    out = [1]
    while (size // out[-1] > tile or len(out) < 3) and out[-1] * 4 <= BLOCK:
        out.append(out[-1] * 4)
    return out


def aperio_description(size: int, tile: int, quality: int, ds: int) -> str:
    """An Aperio ImageDescription (openslide's aperio driver keys on the 'Aperio' prefix)."""
    w = h = size // ds
    head = (f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] "
            f"({tile}x{tile}) JPEG/RGB Q={quality}")
    if ds > 1:
        head += f" -> {w}x{h} - "
    return (f"{head}|AppMag = {APP_MAG}|MPP = {MPP * ds:.4f}|"
            f"Filename = histotile-benchmark|Title = histotile benchmark mosaic")


def _page_args(size: int, tile: int, quality: int, ds: int, svs_like: bool) -> dict:
    """tifffile.write arguments shared by every page of level downsample ``ds``."""
    px_per_cm = 1e4 / (MPP * ds)
    return {
        "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality},
        "resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER",
        "description": aperio_description(size, tile, quality, ds) if svs_like else None,
        "metadata": None, "software": "histotile bench/make_slide.py",
        # Aperio levels are full pages (subfiletype 0); generic pyramids mark reduced levels
        "subfiletype": 0 if (ds == 1 or svs_like) else 1,
    }


def _thumbnail_downsample(size: int) -> int:
    ds = 1
    while size // ds > 1024 and ds * 4 <= BLOCK:
        ds *= 4
    return ds


def make_benchmark_slide(path: str | Path, size: int = 20000, seed: int = 0,
                         svs_like: bool = False, tile: int = 256, quality: int = 90) -> Path:
    """Write the benchmark mosaic to ``path`` (atomically) and return it.

    Pyramidal tiled TIFF, JPEG ``tile`` px tiles at ``quality``, levels by 4×, mpp 0.5 in the
    resolution tags (cm); ``svs_like`` adds an Aperio ImageDescription on every level instead.
    """
    import tifffile

    if size < tile:
        raise ValueError(f"size {size} is smaller than one tile ({tile})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mosaic = Mosaic(size, seed)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=size > 30000) as tif:
            for ds in level_downsamples(size, tile):
                shape = (size // ds, size // ds)
                common = _page_args(size, tile, quality, ds, svs_like)
                tif.write(mosaic.tiles(ds, shape, tile), shape=(*shape, 3), dtype=np.uint8,
                          tile=(tile, tile), **common)
                if svs_like and ds == 1:  # Aperio layout: a stripped thumbnail is the 2nd page
                    tds = _thumbnail_downsample(size)
                    w = size // tds
                    thumb = mosaic.rows(0, w, w, tds)
                    tif.write(thumb, rowsperstrip=16, **{
                        **_page_args(size, tile, quality, tds, svs_like), "subfiletype": 0})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output .tif (or .svs with --svs)")
    ap.add_argument("--size", type=int, default=20000, help="width = height in level-0 px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--svs", action="store_true", help="Aperio-style (SVS-like) variant")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args(argv)
    out = make_benchmark_slide(args.out, args.size, args.seed, args.svs, args.tile, args.quality)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
