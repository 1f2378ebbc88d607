"""Region reads straight from the tiles of a tiled TIFF pyramid (tifffile + imagecodecs).

OpenSlide decodes Aperio SVS and generic tiled TIFF at 23-35 Mpx/s here, tiffslide (through
zarr 3's async store) at 64-85 Mpx/s; reading the tiles a region covers with tifffile's file
handle and decoding each with tifffile's own decoder (libjpeg-turbo through imagecodecs) runs
at ~113 Mpx/s and opens in milliseconds instead of tiffslide's ~0.3 s import (BENCHMARKS.md,
"Whole-slide predict"). The pixels equal OpenSlide's (tests/test_slide.py); layouts this
reader does not know are left to the slide's own library (:func:`open_tile_reader` → None).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

# none, LZW, JPEG, deflate (Adobe and old code): what OpenSlide and tifffile decode alike
COMPRESSIONS = (1, 5, 7, 8, 32946)


class TiffTileReader:
    """Level pixels of a tiled, contiguous 8-bit RGB TIFF pyramid, tile by tile."""

    def __init__(self, tif: Any, pages: list[Any]) -> None:
        self._tif = tif
        self._pages = pages
        self._lock = threading.Lock()
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in pages]

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 ``(y1-y0, x1-x0, 3)`` of level pixels ``[x0, x1) x [y0, y1)`` (inside the
        level), into ``out`` when given; missing (empty) tiles are white."""
        page = self._pages[level]
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(int(page.imagewidth) / tw)
        if out is None:
            out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        tx0, tx1 = x0 // tw, (x1 - 1) // tw
        ty0, ty1 = y0 // th, (y1 - 1) // th
        index = [ty * across + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        offsets = [page.dataoffsets[i] for i in index]
        counts = [page.databytecounts[i] for i in index]
        decode = page.decode
        tables = getattr(page, "jpegtables", None)
        with self._lock:  # one file position: reads from several threads take turns
            segments = list(self._tif.filehandle.read_segments(offsets, counts, index,
                                                               sort=True))
        for data, i in segments:
            ty, tx = divmod(i, across)
            ax0, ay0 = max(tx * tw, x0), max(ty * th, y0)
            ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
            if not data:
                out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = 255
                continue
            tile = decode(data, i, jpegtables=tables, _fullsize=True)[0]
            tile = tile.reshape(th, tw, -1)
            out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = \
                tile[ay0 - ty * th:ay1 - ty * th, ax0 - tx * tw:ax1 - tx * tw, :3]
        return out

    def close(self) -> None:
        self._tif.close()


def open_tile_reader(path: str | Path,
                     level_dimensions: list[tuple[int, int]]) -> TiffTileReader | None:
    """A reader for ``path`` when its first series is a pyramid with exactly these level
    sizes, tiled, 8-bit RGB (contiguous), in a compression OpenSlide decodes alike; else None.
    (``open_slide`` quiets tifffile's logger around this.)"""
    import tifffile

    tif = None
    try:
        tif = tifffile.TiffFile(str(path))
        pages = [level.keyframe for level in tif.series[0].levels]
        ok = len(pages) == len(level_dimensions) and all(
            page.is_tiled and page.tiledepth == 1 and page.planarconfig == 1
            and page.samplesperpixel == 3 and page.bitspersample == 8
            and page.dtype == np.uint8 and int(page.compression) in COMPRESSIONS
            and (int(page.photometric) == 2 or (int(page.photometric) == 6
                                                and int(page.compression) == 7))
            and (int(page.imagewidth), int(page.imagelength)) == tuple(dims)
            for page, dims in zip(pages, level_dimensions, strict=False))
    except Exception:  # noqa: BLE001 - anything unusual: the slide library reads it
        ok = False
    if not ok:
        if tif is not None:
            tif.close()
        return None
    return TiffTileReader(tif, pages)
