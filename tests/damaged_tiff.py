"""Generated damaged slides: tiled JPEG pyramids (tifffile) with the bytes of one tile broken.

``write_pyramid`` writes a generic tiled TIFF pyramid (levels halved, JPEG tiles, a real pixel
size); ``damage_tile`` finds one tile through the page's TileOffsets/TileByteCounts and breaks
it in place:

* ``header``: the JPEG header (SOI marker and the first segments) zeroed;
* ``garbage``: the whole tile overwritten with seeded random bytes;
* ``truncated``: the tile's byte count in the IFD cut to a few bytes (the entropy-coded data
  is gone; the file itself stays the same size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

MODES = ("header", "garbage", "truncated")


def write_pyramid(path: Path, rgb: np.ndarray, levels: int = 3, tile: int = 256,
                  mpp: float = 0.5, compression: str = "jpeg") -> Path:
    """A generic tiled pyramidal TIFF of ``rgb`` (levels halved) with ``mpp`` in its tags."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            img = np.ascontiguousarray(rgb[:: 2**k, :: 2**k])
            tw.write(img, tile=(tile, tile), compression=compression, photometric="rgb",
                     resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0)
    return path


def tile_location(path: Path, page: int, index: int) -> tuple[int, int]:
    """(file offset, byte count) of tile ``index`` of page ``page``."""
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        return int(p.dataoffsets[index]), int(p.databytecounts[index])


def tile_index(path: Path, page: int, x: int, y: int) -> int:
    """Index of the tile holding page pixel (x, y)."""
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        across = -(-int(p.imagewidth) // int(p.tilewidth))
        return (y // int(p.tilelength)) * across + x // int(p.tilewidth)


def damage_tile(path: Path, page: int, index: int, mode: str, seed: int = 0) -> None:
    """Break tile ``index`` of page ``page`` in place (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    offset, count = tile_location(path, page, index)
    with open(path, "r+b") as fh:
        if mode == "header":
            fh.seek(offset)
            fh.write(b"\0" * min(count, 64))
        elif mode == "garbage":
            fh.seek(offset)
            fh.write(np.random.default_rng(seed).integers(0, 256, count, np.uint8).tobytes())
        else:
            _set_tile_bytecount(fh, path, page, index, min(count, 8))


def _set_tile_bytecount(fh, path: Path, page: int, index: int, value: int) -> None:
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        tag = p.tags["TileByteCounts"]
        if tag.count == 1:  # the value sits in the IFD entry itself
            where, fmt = tag.valueoffset, tag.dtype
        else:
            size = np.dtype(tf.byteorder + tifffile.TIFF.DATA_FORMATS[tag.dtype][-1]).itemsize
            where, fmt = tag.valueoffset + index * size, tag.dtype
        code = tifffile.TIFF.DATA_FORMATS[fmt][-1]
        fh.seek(where)
        fh.write(np.array([value], dtype=tf.byteorder + code).tobytes())


def damaged_pyramid(folder: Path, rgb: np.ndarray, mode: str, x: int = 512, y: int = 512) -> Path:
    """GENERATED: ``write_pyramid`` of ``rgb`` with the level-0 tile holding pixel (x, y) broken
    in ``mode`` (header, garbage or truncated)."""
    path = write_pyramid(folder / f"generated-damaged-{mode}.tif", rgb)
    damage_tile(path, 0, tile_index(path, 0, x, y), mode)
    return path
