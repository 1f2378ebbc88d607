"""Stitching per-patch outputs into ``heatmap.ome.zarr``.

- :mod:`histotile.stitch.heatmap`: the class-probability heatmap (:class:`HeatmapWriter`,
  :class:`MultiscaleWriter`) and reading it back (``read_heatmap``, ``read_coverage``, pixel <->
  level-0 conversions)
- :mod:`histotile.stitch.cam`: Grad-CAM / attention maps stitched into the same store
  (:class:`CamStitcher`, ``read_gradcam``)
"""

from __future__ import annotations

from histotile.stitch.cam import CamStitcher, read_gradcam
from histotile.stitch.heatmap import (
    COVERAGE_PREDICTED,
    COVERAGE_UNREADABLE,
    MIN_PYRAMID_SIDE,
    VALUE_SCALE,
    HeatmapWriter,
    MultiscaleWriter,
    as_pair,
    coarsen_mean,
    heatmap_pixel_to_level0,
    level0_to_heatmap_pixel,
    open_heatmap,
    read_coverage,
    read_heatmap,
    to_uint8,
)

__all__ = [
    "COVERAGE_PREDICTED", "COVERAGE_UNREADABLE", "MIN_PYRAMID_SIDE", "VALUE_SCALE", "CamStitcher",
    "HeatmapWriter", "MultiscaleWriter",
    "as_pair", "coarsen_mean", "heatmap_pixel_to_level0", "level0_to_heatmap_pixel",
    "open_heatmap", "read_coverage", "read_gradcam", "read_heatmap", "to_uint8",
]
