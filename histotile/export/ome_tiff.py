"""Pyramidal OME-TIFF of the heatmap for viewers without OME-Zarr support.

The image is RGB: each pixel (one per patch step) has the colour of its argmax class from the
model card; pixels where no patch was predicted are black. Levels are the OME-Zarr pyramid's
(2x each, SubIFDs), written tile by tile from the zarr (memory bounded by a tile row). The
physical pixel size is slide mpp x stride_level0 (micrometers). Per-class probabilities stay in
``heatmap.ome.zarr``; class names and colours are listed in the image description.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import InputNotFoundError
from histotile.fileio import atomic_path
from histotile.stitch import as_pair, open_heatmap

TILE = 256
OME_TIFF = "heatmap.ome.tif"


def _rgb_tiles(data: Any, cover: Any, palette: np.ndarray) -> Iterator[np.ndarray]:
    """Row-major TILE x TILE RGB tiles (edge tiles zero-padded) of an argmax-coloured level."""
    _, h, w = data.shape
    for y0 in range(0, h, TILE):
        rows = data[:, y0:y0 + TILE, :]
        covered = cover[0, y0:y0 + TILE, :] > 0
        rgb = np.where(covered[..., None], palette[rows.argmax(axis=0)], 0).astype(np.uint8)
        for x0 in range(0, w, TILE):
            tile = np.zeros((TILE, TILE, 3), np.uint8)
            part = rgb[:, x0:x0 + TILE]
            tile[:part.shape[0], :part.shape[1]] = part
            yield tile


def write_heatmap_ome_tiff(heatmap: str | Path, out: str | Path) -> Path:
    """Write ``out`` (pyramidal OME-TIFF, argmax colours) from a ``heatmap.ome.zarr``."""
    import tifffile


    root = open_heatmap(heatmap)
    attrs = dict(root.attrs["histotile"])
    palette = np.asarray(attrs["class_colors"], dtype=np.uint8)
    levels = int(attrs.get("levels", 1))
    mpp = attrs.get("slide_mpp")
    sx, sy = as_pair(attrs["stride_level0"])
    meta: dict[str, Any] = {"axes": "YXS", "Name": "histotile heatmap (argmax colours)"}
    if mpp is not None:
        mx, my = as_pair(mpp)
        meta.update({"PhysicalSizeX": sx * mx, "PhysicalSizeXUnit": "µm",
                     "PhysicalSizeY": sy * my, "PhysicalSizeYUnit": "µm"})
    legend = "; ".join(f"{n}=#{''.join(f'{v:02X}' for v in c)}"
                       for n, c in zip(attrs["class_names"], attrs["class_colors"], strict=True))
    meta["Description"] = f"histotile {attrs.get('histotile_version', '')}; classes: {legend}"
    out = Path(out)
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for level in range(levels):
            data, cover = root[str(level)], root["labels/coverage"][str(level)]
            _, h, w = data.shape
            opts: dict[str, Any] = {
                "shape": (h, w, 3), "dtype": np.uint8, "tile": (TILE, TILE),
                "photometric": "rgb", "compression": "zlib",
            }
            if level == 0:
                opts.update(subifds=levels - 1, metadata=meta)
                if "PhysicalSizeX" in meta:  # also for non-OME readers, in pixels per cm
                    opts.update(resolution=(1e4 / meta["PhysicalSizeX"],
                                            1e4 / meta["PhysicalSizeY"]),
                                resolutionunit="CENTIMETER")
            else:
                opts.update(subfiletype=1, metadata=None)
            tif.write(_rgb_tiles(data, cover, palette), **opts)
    return out


def export_ome_tiff(result_dir: str | Path, out: str | Path | None = None) -> Path:
    """``<result_dir>/heatmap.ome.tif`` (or ``out``) from the folder's ``heatmap.ome.zarr``."""
    result_dir = Path(result_dir)
    heatmap = result_dir / "heatmap.ome.zarr"
    if not heatmap.exists():
        raise InputNotFoundError(f"no heatmap.ome.zarr in {result_dir}",
                                 "point to a histotile predict output folder of a slide")
    return write_heatmap_ome_tiff(heatmap, out or result_dir / OME_TIFF)
