"""Grad-CAM (and attention) maps stitched into the slide's heatmap store, beside the heatmap.

:class:`CamStitcher` accumulates per-patch **raw** maps (``normalise="none"``), so a patch with
more evidence for the class is brighter than one with little; overlapping patches are averaged
(sum + count), a block is written once every patch touching it has arrived, and the stored uint8
value is ``round(clip(mean_raw / cam_scale, 0, 1) * 255)`` with ``cam_scale`` recorded in the
image's ``histotile`` attrs (given, or the slide's maximum). :func:`read_gradcam` reads one back
on the raw scale.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError
from histotile.resample import upsample_maps
from histotile.stitch.heatmap import HeatmapWriter, as_pair, open_heatmap
from histotile.units import Level0Px, Level0Side

if TYPE_CHECKING:
    from histotile.grid import PatchGrid


def to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, np.float32)


class CamStitcher:
    """Accumulate per-patch raw CAMs into the slide's heatmap store as image ``name``.

    ``heatmap`` is a :class:`HeatmapWriter`; ``indices`` (N, 2) (col, row) are
    all grid patches that will arrive. A grid cell is ``block = round(stride_level0 /
    cam_resolution)`` CAM pixels, so one pixel covers ``stride_level0 / block`` level-0 px (the
    effective resolution, recorded), and a patch footprint ``round(patch_size_level0 /
    resolution)`` pixels from its cell's top-left (cut at the image edge). :meth:`add` takes raw
    maps at any size (resized to the footprint); overlapping footprints are averaged, and a block
    is final once every patch touching it has arrived.

    ``cam_scale``: raw value stored as 255. Given → blocks go straight into the store. ``None``
    (default) → final blocks wait in a float32 memory-mapped scratch file (bounded RAM) and are
    written on :meth:`close` scaled by the slide's maximum, so the brightest pixel is 255.
    Call :meth:`close` before the heatmap writer's ``close()`` (which builds the pyramids).
    """

    def __init__(self, heatmap: HeatmapWriter, indices: np.ndarray, *,
                 stride_level0: Level0Side, patch_size_level0: Level0Side,
                 cam_resolution: float, class_name: str = "gradcam",
                 name: str = "gradcam", cam_scale: float | None = None,
                 color: Sequence[int] = (255, 80, 0), chunk: int = 256,
                 attrs: dict[str, Any] | None = None) -> None:
        self.indices = np.asarray(indices, np.int64).reshape(-1, 2)
        stride, stride_y = as_pair(stride_level0)
        if abs(stride - stride_y) > 1e-6 or cam_resolution <= 0:
            raise InvalidArgumentError("Grad-CAM stitching needs equal x/y strides and a "
                                       f"positive --cam-resolution (got {cam_resolution})",
                                       "use a square grid and e.g. --cam-resolution 8")
        self.block = max(1, round(stride / cam_resolution))
        self.resolution = Level0Px(stride / self.block)  # the effective level-0 px per CAM pixel
        self.foot = max(1, round(as_pair(patch_size_level0)[0] / self.resolution))
        self.reach = math.ceil(self.foot / self.block)  # blocks per footprint side
        self.cols, self.rows = heatmap.image.width, heatmap.image.height
        self.expected = self._touch_counts(self.indices)
        self.cam_scale = cam_scale
        self.name = name
        self.max_value = 0.0
        self._open: dict[tuple[int, int], list[Any]] = {}  # block -> [sum, count, arrived]
        self.peak_open_blocks = 0
        self.writer = heatmap.add_image(
            name, block=self.block, stride_level0=self.resolution, channel_names=[class_name],
            channel_colors=[tuple(color)], expected=np.array(list(self.expected), np.int64),
            chunk=chunk)
        self._attrs = {"cam_resolution_level0": self.resolution,
                       "cam_resolution_asked": float(cam_resolution),
                       "patch_footprint_px": self.foot,
                       "normalisation": "raw Grad-CAM (ReLU, not per-patch normalised); stored "
                                        "round(clip(mean_raw / cam_scale, 0, 1) * 255)",
                       "overlap": "mean of overlapping patches", **(attrs or {})}
        self._scratch: Path | None = None
        self._mm: np.ndarray | None = None
        self._done: np.ndarray | None = None
        self.closed = False

    @classmethod
    def from_grid(cls, heatmap: HeatmapWriter, grid: PatchGrid, cam_resolution: float,
                  **kwargs: Any
                  ) -> CamStitcher:
        """For a :class:`histotile.grid.PatchGrid` (its indices, stride and patch size)."""
        return cls(heatmap, grid.indices, stride_level0=grid.stride_level0,
                   patch_size_level0=grid.patch_size_level0, cam_resolution=cam_resolution,
                   **kwargs)

    def _touch_counts(self, idx: np.ndarray) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for dc in range(self.reach):
            for dr in range(self.reach):
                c, r = idx[:, 0] + dc, idx[:, 1] + dr
                keep = (c < self.cols) & (r < self.rows)
                for key in zip(c[keep].tolist(), r[keep].tolist(), strict=True):
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def add(self, indices: np.ndarray, cams: Any) -> None:
        """``indices`` (n, 2) (col, row) of the grid; ``cams`` (n, h, w) raw maps (any size)."""
        idx = np.asarray(indices, np.int64).reshape(-1, 2)
        maps = upsample_maps(to_numpy(cams), self.foot)
        b, span = self.block, self.reach * self.block
        ready: list[tuple[int, int]] = []
        for (col, row), m in zip(idx.tolist(), maps, strict=True):
            pad = np.zeros((span, span), np.float32)
            pad[:self.foot, :self.foot] = m
            cover = np.zeros((span, span), np.float32)
            cover[:self.foot, :self.foot] = 1
            for dr in range(self.reach):
                for dc in range(self.reach):
                    key = (col + dc, row + dr)
                    if key not in self.expected:
                        continue
                    entry = self._open.setdefault(
                        key, [np.zeros((b, b), np.float32), np.zeros((b, b), np.float32), 0])
                    ys, xs = slice(dr * b, (dr + 1) * b), slice(dc * b, (dc + 1) * b)
                    entry[0] += pad[ys, xs]
                    entry[1] += cover[ys, xs]
                    entry[2] += 1
                    if entry[2] >= self.expected[key]:
                        ready.append(key)
        self.peak_open_blocks = max(self.peak_open_blocks, len(self._open))
        if ready:
            self._emit(ready)

    def _emit(self, keys: list[tuple[int, int]]) -> None:
        means = []
        for key in keys:
            s, n, _ = self._open.pop(key)
            means.append(np.where(n > 0, s / np.maximum(n, 1), 0).astype(np.float32))
        vals = np.stack(means)
        self.max_value = max(self.max_value, float(vals.max(initial=0)))
        idx = np.array(keys, np.int64)
        if self.cam_scale is not None:
            self.writer.write(idx, self._scaled(vals, self.cam_scale))
            return
        mm, done = self._scratch_map()
        b = self.block
        for (col, row), v in zip(keys, vals, strict=True):
            mm[row * b:(row + 1) * b, col * b:(col + 1) * b] = v
        done[idx[:, 1], idx[:, 0]] = True

    def _scratch_map(self) -> tuple[np.ndarray, np.ndarray]:
        """The memory-mapped float32 map and its (rows, cols) written-block mask."""
        if self._mm is None or self._done is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="histotile-cam-"))
            shape = (self.rows * self.block, self.cols * self.block)
            self._mm = np.lib.format.open_memmap(self._scratch / "cam.npy", mode="w+",
                                                 dtype=np.float32, shape=shape)
            self._done = np.zeros((self.rows, self.cols), bool)
        return self._mm, self._done

    @staticmethod
    def _scaled(vals: np.ndarray, scale: float) -> np.ndarray:
        out = np.clip(vals / scale, 0, 1) if scale > 0 else np.zeros_like(vals)
        return np.rint(out * 255).astype(np.uint8)[:, None]

    def close(self) -> None:
        """Emit blocks still open (patches that never came), write scratch blocks, record attrs."""
        if self.closed:
            return
        if self._open:
            self._emit(list(self._open))
        if self.cam_scale is None:
            self.cam_scale = self.max_value if self.max_value > 0 else 1.0
            self._attrs["cam_scale_source"] = "slide maximum"
            if self._mm is not None:
                self._write_scratch(self.cam_scale)
        else:
            self._attrs.setdefault("cam_scale_source", "given")
        self._attrs.update({"cam_scale": float(self.cam_scale), "raw_max": self.max_value})
        self.writer.group.attrs.update({"histotile": {
            **dict(self.writer.group.attrs.get("histotile", {})), **self._attrs}})
        self.closed = True

    def _write_scratch(self, scale: float) -> None:
        """Copy the scratch map into the store, one band of block rows at a time."""
        b = self.block
        mm, done = self._scratch_map()
        band = max(1, self.writer.chunk // b)
        try:
            for r0 in range(0, self.rows, band):
                rows, cols = np.nonzero(done[r0:r0 + band])
                if not len(rows):
                    continue
                strip = np.asarray(mm[r0 * b:(r0 + band) * b])
                rows_l = rows.tolist()
                vals = np.stack([strip[r * b:(r + 1) * b, c * b:(c + 1) * b]
                                 for r, c in zip(rows_l, cols.tolist(), strict=True)])
                idx = np.stack([cols, rows + r0], axis=1)
                self.writer.write(idx, self._scaled(vals, scale))
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the scratch map (also after a failed run)."""
        self._mm = self._done = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def read_gradcam(path: str | Path, level: int = 0, name: str = "gradcam"
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(raw-scale map float32 (rows, cols), coverage bool, attrs) of a stitched CAM image."""
    group = open_heatmap(path)[name]
    attrs = dict(group.attrs.get("histotile", {}))
    scale = float(attrs.get("cam_scale", 1.0))
    values = np.asarray(group[str(level)][0], np.float32) / 255 * scale
    cover = np.asarray(group["labels/coverage"][str(level)][0]) > 0
    return values, cover, attrs
