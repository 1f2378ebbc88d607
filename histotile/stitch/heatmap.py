"""Stitch per-patch predictions into an OME-Zarr (NGFF 0.4, zarr v2 format) heatmap, chunk by chunk.

Layout of ``heatmap.ome.zarr`` (the root group is an NGFF multiscale image)::

    .zattrs          multiscales (axes c,y,x; scale/translation in micrometers), omero, histotile
    0, 1, ...        pyramid levels, uint8, value = round(p * 255); 0 where no patch was predicted
    labels/coverage  NGFF label image (1, y, x): 1 = predicted, 2 = unreadable (its pixels
                     could not be decoded), 0 = not predicted; same pyramid

One level-0 pixel ``(col, row)`` is the patch ``(col, row)`` of the grid: its level-0 top-left is
``origin_level0 + (col, row) * stride_level0`` and it covers ``stride_level0`` level-0 pixels. The
coordinate transformations use the pixel-corner convention (translation = origin x mpp at every
level). Pyramid level k+1 is the mean over the *predicted* pixels of each 2x2 block of level k
(unpredicted pixels do not dilute it); its coverage is 1 where any of the four was predicted,
else 2 where any was unreadable.

Memory is bounded by the open chunks: a chunk is written as soon as every patch the grid expects in
it has arrived (batches come in tile-aligned region order), the rest is flushed on close, and the
pyramid is built chunk by chunk from the level below. More named images (e.g. a finer Grad-CAM grid)
go into the same store through :meth:`HeatmapWriter.add_image` / :class:`MultiscaleWriter`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histotile import __version__
from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.fileio import commit, json_safe, temp_path
from histotile.units import Level0Px, Level0Side, MicronsPerPixel

VALUE_SCALE = 255
COVERAGE_PREDICTED, COVERAGE_UNREADABLE = 1, 2  # labels/coverage values (0: not predicted)
MIN_PYRAMID_SIDE = 256
_EPS = 1e-6  # float tolerance on level-0 positions
_ENCODING = {"name": "v2", "separator": "/"}


def as_pair(value: Any) -> tuple[float, float]:
    """(x, y) from a scalar or a pair."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _hex(color: Sequence[int]) -> str:
    return "".join(f"{int(c):02X}" for c in color[:3])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to the stored uint8 value ``round(p * 255)``."""
    return np.rint(np.clip(values, 0.0, 1.0) * VALUE_SCALE).astype(np.uint8)


class MultiscaleWriter:
    """One NGFF multiscale image (axes c,y,x) in ``parent[name]``, written block by block.

    The image is a grid of ``block x block`` pixel blocks; block ``(col, row)`` covers pixels
    ``[row*block, (row+1)*block) x [col*block, (col+1)*block)``. ``expected`` lists every block
    index (col, row) that will be written, so a chunk is flushed as soon as it is complete.
    ``pixel_size`` / ``translation`` are (x, y) in ``unit`` at level 0.
    """

    def __init__(
        self,
        parent: Any,
        name: str,
        *,
        channel_names: Sequence[str],
        channel_colors: Sequence[Sequence[int]],
        grid_shape: tuple[int, int],
        expected: np.ndarray,
        pixel_size: tuple[float, float],
        translation: tuple[float, float],
        unit: str | None = "micrometer",
        block: int = 1,
        chunk: int = 256,
        coverage_label: bool = True,
    ) -> None:
        cols, rows = int(grid_shape[0]), int(grid_shape[1])
        if cols < 1 or rows < 1:
            raise InvalidArgumentError(f"empty heatmap grid {grid_shape}", "the grid has no patch")
        self.block = int(block)
        self.chunk = max(self.block, (int(chunk) // self.block) * self.block)
        self.channels = len(channel_names)
        self.channel_names = list(channel_names)
        self.channel_colors = [tuple(int(v) for v in c) for c in channel_colors]
        self.pixel_size, self.translation, self.unit = pixel_size, translation, unit
        self.height, self.width = rows * self.block, cols * self.block
        self.group = parent.require_group(name) if name else parent
        self.coverage_label = coverage_label
        self._data = self._create(self.group, "0", self.channels)
        self._cov = None
        if coverage_label:
            labels = self.group.require_group("labels")
            labels.attrs.update({"labels": ["coverage"]})
            self._cov_group = labels.require_group("coverage")
            self._cov = self._create(self._cov_group, "0", 1)
        self._nchunk_x = math.ceil(self.width / self.chunk)
        idx = np.asarray(expected, dtype=np.int64).reshape(-1, 2)
        self._expected = np.bincount(self._chunk_ids(idx), minlength=self._nchunk_x * math.ceil(
            self.height / self.chunk)) * self.block * self.block
        self._open: dict[int, list[Any]] = {}  # chunk id -> [values, coverage, pixels arrived]
        self._flushed: set[int] = set()
        self.peak_open_chunks = 0
        self.chunks_written = 0
        self.levels = 1
        self.closed = False

    def _create(self, group: Any, path: str, channels: int, shape: tuple[int, int] | None = None):
        h, w = shape or (self.height, self.width)
        return group.create_array(
            path, shape=(channels, h, w), chunks=(channels, self.chunk, self.chunk),
            dtype="uint8", fill_value=0, chunk_key_encoding=_ENCODING, overwrite=True,
        )

    def _chunk_ids(self, idx: np.ndarray) -> np.ndarray:
        per = self.chunk // self.block
        return (idx[:, 1] // per) * self._nchunk_x + idx[:, 0] // per

    def _chunk_box(self, cid: int) -> tuple[int, int, int, int]:
        cy, cx = divmod(cid, self._nchunk_x)
        y0, x0 = cy * self.chunk, cx * self.chunk
        return y0, min(y0 + self.chunk, self.height), x0, min(x0 + self.chunk, self.width)

    def write(self, indices: np.ndarray, values: np.ndarray,
              cover_value: int = COVERAGE_PREDICTED) -> None:
        """Write blocks: ``indices`` (n, 2) (col, row); ``values`` (n, C) or (n, C, block, block)
        probabilities in [0, 1] (float) or already-scaled uint8; ``cover_value`` is what the
        coverage label gets there."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, 2)
        if len(idx) and (idx.min() < 0 or idx[:, 0].max() * self.block >= self.width
                         or idx[:, 1].max() * self.block >= self.height):
            raise InvalidArgumentError(
                "patch indices outside the heatmap grid",
                f"indices are (col, row) within {self.width // self.block}x"
                f"{self.height // self.block}")
        vals = np.asarray(values)
        vals = vals if vals.dtype == np.uint8 else to_uint8(vals)
        b = self.block
        vals = vals.reshape(len(idx), self.channels, b, b)
        cids = self._chunk_ids(idx)
        for cid in np.unique(cids).tolist():
            sel = np.nonzero(cids == cid)[0]
            y0, y1, x0, x1 = self._chunk_box(cid)
            entry = self._open.get(cid)
            if entry is None:
                entry = self._new_entry(cid)
                self._open[cid] = entry
            values, cover = entry[0], entry[1]
            ys, xs = idx[sel, 1] * b - y0, idx[sel, 0] * b - x0
            fresh = cover[ys, xs] == 0  # a block is new iff its top-left pixel is
            # count each new block once, even if a batch repeats it
            entry[2] += np.unique((ys * (x1 - x0) + xs)[fresh]).size * b * b
            if b == 1:
                values[:, ys, xs] = vals[sel, :, 0, 0].T
                cover[ys, xs] = cover_value
            else:
                for k, yy, xx in zip(sel.tolist(), ys.tolist(), xs.tolist(), strict=True):
                    values[:, yy:yy + b, xx:xx + b] = vals[k]
                    cover[yy:yy + b, xx:xx + b] = cover_value
            if entry[2] >= self._expected[cid]:
                self._flush(cid)
        self.peak_open_chunks = max(self.peak_open_chunks, len(self._open))

    def _new_entry(self, cid: int) -> list[Any]:
        """Buffers for a chunk; a chunk written before (a late patch) is read back first."""
        y0, y1, x0, x1 = self._chunk_box(cid)
        if cid in self._flushed:
            values = np.asarray(self._data[:, y0:y1, x0:x1])
            cover = (np.asarray(self._cov[0, y0:y1, x0:x1]) if self._cov is not None
                     else np.ones((y1 - y0, x1 - x0), np.uint8))
            return [values, cover, int(np.count_nonzero(cover))]
        return [np.zeros((self.channels, y1 - y0, x1 - x0), np.uint8),
                np.zeros((y1 - y0, x1 - x0), np.uint8), 0]

    def _flush(self, cid: int) -> None:
        values, cover, _ = self._open.pop(cid)
        y0, y1, x0, x1 = self._chunk_box(cid)
        self._data[:, y0:y1, x0:x1] = values
        if self._cov is not None:
            self._cov[0, y0:y1, x0:x1] = cover
        self.chunks_written += 1
        self._flushed.add(cid)

    def close(self) -> None:
        """Flush partial chunks, build the pyramid, write the NGFF metadata."""
        if self.closed:
            return
        for cid in list(self._open):
            self._flush(cid)
        self.levels = self._build_pyramid()
        self._write_metadata()
        self.closed = True

    def _build_pyramid(self) -> int:
        level, h, w = 0, self.height, self.width
        while max(h, w) > MIN_PYRAMID_SIDE:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            _downsample_level(self.group, self._cov_group if self._cov is not None else None,
                              level, (h, w), self._create)
            level += 1
        return level + 1

    def _datasets(self) -> list[dict[str, Any]]:
        sx, sy = self.pixel_size
        tx, ty = self.translation
        return [
            {"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, sy * 2**k, sx * 2**k]},
                {"type": "translation", "translation": [0.0, ty, tx]},
            ]}
            for k in range(self.levels)
        ]

    def _multiscales(self, name: str) -> list[dict[str, Any]]:
        space = {"type": "space", **({"unit": self.unit} if self.unit else {})}
        axes = [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]
        return [{
            "version": "0.4", "name": name, "axes": axes, "datasets": self._datasets(),
            "type": "mean",
            "metadata": {"description": "level k+1 = mean of the predicted pixels (coverage 1) "
                                        "of each 2x2 block of level k"},
        }]

    def _write_metadata(self) -> None:
        channels = [
            {"label": n, "color": _hex(c), "active": True, "coefficient": 1.0, "family": "linear",
             "inverted": False,
             "window": {"min": 0, "max": VALUE_SCALE, "start": 0, "end": VALUE_SCALE}}
            for n, c in zip(self.channel_names, self.channel_colors, strict=True)
        ]
        self.group.attrs.update({
            "multiscales": self._multiscales(self.group.basename or "heatmap"),
            "omero": {"channels": channels, "rdefs": {"model": "color"}},
        })
        if self._cov is not None:
            self._cov_group.attrs.update({
                "multiscales": self._multiscales("coverage"),
                "image-label": {"version": "0.4", "source": {"image": "../../"},
                                "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]},
                                           {"label-value": 1, "rgba": [255, 255, 255, 128]},
                                           {"label-value": 2, "rgba": [255, 0, 0, 160]}],
                                "properties": [{"label-value": 0, "name": "not predicted"},
                                               {"label-value": 1, "name": "predicted"},
                                               {"label-value": 2, "name": "unreadable"}]},
            })


def _downsample_level(group: Any, cov_group: Any, level: int, shape: tuple[int, int],
                      create: Any) -> None:
    """Level ``level+1`` from ``level``, chunk by chunk: coverage-weighted 2x2 mean."""
    src = group[str(level)]
    src_cov = cov_group[str(level)] if cov_group is not None else None
    dst = create(group, str(level + 1), src.shape[0], shape)
    dst_cov = create(cov_group, str(level + 1), 1, shape) if cov_group is not None else None
    ch = dst.chunks[1]
    for y0 in range(0, shape[0], ch):
        for x0 in range(0, shape[1], ch):
            y1, x1 = min(y0 + ch, shape[0]), min(x0 + ch, shape[1])
            block = src[:, 2 * y0:2 * y1, 2 * x0:2 * x1]
            cover = (src_cov[0, 2 * y0:2 * y1, 2 * x0:2 * x1] if src_cov is not None
                     else np.ones(block.shape[1:], np.uint8))
            values, covered = coarsen_mean(block, cover, (y1 - y0, x1 - x0))
            dst[:, y0:y1, x0:x1] = values
            if dst_cov is not None:
                dst_cov[0, y0:y1, x0:x1] = covered


def coarsen_mean(values: np.ndarray, cover: np.ndarray,
                 shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """2x2 mean of ``values`` (C, h, w) over the predicted pixels (``cover`` (h, w) 1).

    Returns (uint8 (C, *shape), coverage uint8 (*shape): 1 where any pixel was predicted, else
    2 where any was unreadable, else 0); odd edges are padded as uncovered.
    """
    c = values.shape[0]
    h2, w2 = shape[0] * 2, shape[1] * 2
    v = np.zeros((c, h2, w2), np.float64)
    m = np.zeros((h2, w2), np.float64)
    v[:, :values.shape[1], :values.shape[2]] = values
    m[:cover.shape[0], :cover.shape[1]] = cover == COVERAGE_PREDICTED
    bad = np.zeros((h2, w2), bool)
    bad[:cover.shape[0], :cover.shape[1]] = cover == COVERAGE_UNREADABLE
    weights = m.reshape(shape[0], 2, shape[1], 2).sum(axis=(1, 3))
    unreadable = bad.reshape(shape[0], 2, shape[1], 2).any(axis=(1, 3))
    sums = (v * m).reshape(c, shape[0], 2, shape[1], 2).sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(weights > 0, sums / np.maximum(weights, 1), 0)
    coverage = np.where(weights > 0, COVERAGE_PREDICTED,
                        np.where(unreadable, COVERAGE_UNREADABLE, 0)).astype(np.uint8)
    return np.rint(mean).astype(np.uint8), coverage


class HeatmapWriter:
    """Stream per-patch class probabilities into ``heatmap.ome.zarr`` (see the module doc).

    ``attrs`` carries the grid geometry (``origin_level0``, ``stride_level0``,
    ``patch_size_level0``, ``slide_mpp``, ``mpp_source``; e.g. ``PatchGrid.to_attrs()``) and is
    stored under ``histotile`` with the class names and ``value_scale``. Written to a
    temporary folder beside ``path`` and renamed on :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        grid_shape: tuple[int, int],
        indices_all: np.ndarray,
        class_names: Sequence[str],
        class_colors: Sequence[Sequence[int]],
        attrs: dict[str, Any],
        chunk: int = 256,
    ) -> None:
        import zarr

        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.attrs = dict(attrs)
        self.class_names = list(class_names)
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        mpp = self.attrs.get("slide_mpp")
        mpp_x, mpp_y = as_pair(mpp) if mpp is not None else (1.0, 1.0)
        self._mpp = (MicronsPerPixel(mpp_x), MicronsPerPixel(mpp_y))  # 1.0: no unit
        self._unit = "micrometer" if mpp is not None else None
        ox, oy = as_pair(self.attrs.get("origin_level0", (0, 0)))
        self._origin = (Level0Px(ox), Level0Px(oy))
        stride = self.attrs.get("stride_level0")
        if stride is None:
            raise InvalidArgumentError("heatmap attrs lack stride_level0",
                                       "pass the grid's to_attrs()")
        sx, sy = as_pair(stride)
        self.image = MultiscaleWriter(
            self.root, "", channel_names=self.class_names, channel_colors=class_colors,
            grid_shape=grid_shape, expected=indices_all,
            pixel_size=(sx * mpp_x, sy * mpp_y),
            translation=(self._origin[0] * mpp_x, self._origin[1] * mpp_y),
            unit=self._unit, chunk=chunk,
        )
        self._extra: list[MultiscaleWriter] = []
        self._indices = indices_all
        self.attrs.update({
            "class_names": self.class_names,
            "class_colors": [list(map(int, c)) for c in class_colors],
            "grid_shape": [int(grid_shape[0]), int(grid_shape[1])],
            "value_scale": VALUE_SCALE,
            "value": "round(probability * value_scale) as uint8; 0 where coverage is 0",
            "pixel_convention": "pixel (col,row) covers stride_level0 level-0 px from "
                                "origin_level0 + (col,row) * stride_level0",
            "histotile_version": __version__,
        })

    def write(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Write a batch: grid ``indices`` (n, 2) (col, row), ``values`` (n, C) probabilities."""
        self.image.write(indices, values)

    def mark_unreadable(self, indices: np.ndarray) -> None:
        """Grid ``indices`` (n, 2) whose pixels could not be decoded: value 0, coverage
        ``COVERAGE_UNREADABLE`` in every image of the store."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, 2)
        if not len(idx):
            return
        for writer in (self.image, *self._extra):
            b = writer.block
            zeros = np.zeros((len(idx), writer.channels, b, b), np.uint8)
            writer.write(idx, zeros, cover_value=COVERAGE_UNREADABLE)

    def add_image(self, name: str, *, block: int,
                  stride_level0: Level0Side,
                  channel_names: Sequence[str], channel_colors: Sequence[Sequence[int]],
                  expected: np.ndarray | None = None, chunk: int = 256) -> MultiscaleWriter:
        """Another multiscale image ``name`` in the same store (e.g. ``gradcam``): each grid patch
        (col, row) is a ``block x block`` pixel block; one pixel covers ``stride_level0`` level-0
        px. Write to it with ``.write(indices, values (n, C, block, block))``; closed with us."""
        sx, sy = as_pair(stride_level0)
        cols, rows = self.image.width, self.image.height
        writer = MultiscaleWriter(
            self.root, name, channel_names=channel_names, channel_colors=channel_colors,
            grid_shape=(cols, rows), block=block,
            expected=self._indices if expected is None else expected,
            pixel_size=(sx * self._mpp[0], sy * self._mpp[1]),
            translation=(self._origin[0] * self._mpp[0], self._origin[1] * self._mpp[1]),
            unit=self._unit, chunk=chunk, coverage_label=True,
        )
        writer.group.attrs.update({"histotile": {"stride_level0": stride_level0, "block": block}})
        self._extra.append(writer)
        return writer

    @property
    def peak_open_chunks(self) -> int:
        return self.image.peak_open_chunks

    def close(self) -> Path:
        """Flush, build pyramids, write metadata and rename the temporary store to ``path``."""
        if self.image.closed:
            return self.path
        self.image.close()
        for extra in self._extra:
            extra.close()
        self.attrs["levels"] = self.image.levels
        self.root.attrs.update({"histotile": json_safe(self.attrs)})
        return commit(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the partial store."""
        self.image.closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> HeatmapWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_heatmap(path: str | Path) -> Any:
    """The heatmap's root zarr group (read-only)."""
    import zarr


    if not Path(path).exists():
        raise InputNotFoundError(f"no heatmap at {path}", "run histotile predict first")
    return zarr.open_group(str(path), mode="r", zarr_format=2)


def read_heatmap(path: str | Path, level: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(probabilities (C, rows, cols) float32 in [0, 1] at ``level``, the ``histotile`` attrs).

    Unpredicted pixels read 0; ``read_coverage`` tells them apart.
    """
    root = open_heatmap(path)
    data = np.asarray(root[str(level)][:], dtype=np.float32) / VALUE_SCALE
    return data, dict(root.attrs["histotile"])


def read_coverage(path: str | Path, level: int = 0) -> np.ndarray:
    """Boolean (rows, cols): True where a patch was predicted (not where it was unreadable)."""
    cover = np.asarray(open_heatmap(path)["labels/coverage"][str(level)][0])
    return cover == COVERAGE_PREDICTED


def heatmap_pixel_to_level0(col: Any, row: Any, attrs: dict[str, Any]) -> tuple[Any, Any]:
    """Level-0 top-left (x, y) of heatmap pixel (col, row): ``origin + (col, row) * stride``.

    Exact integers when origin and stride are whole numbers (always on level 0); with a
    fractional stride (grids on a level with a non-integer downsample) rounded up, as
    :mod:`histotile.grid` places patches. Works on scalars and arrays.
    """
    ox, oy = as_pair(attrs["origin_level0"])
    sx, sy = as_pair(attrs["stride_level0"])
    x = np.ceil(ox + np.asarray(col, dtype=np.float64) * sx - _EPS).astype(np.int64)
    y = np.ceil(oy + np.asarray(row, dtype=np.float64) * sy - _EPS).astype(np.int64)
    if x.ndim == 0:
        return int(x), int(y)
    return x, y


def level0_to_heatmap_pixel(x: Any, y: Any, attrs: dict[str, Any]) -> tuple[Any, Any]:
    """Heatmap pixel (col, row) whose stride cell contains level-0 point (x, y)."""
    ox, oy = as_pair(attrs["origin_level0"])
    sx, sy = as_pair(attrs["stride_level0"])
    col = np.floor((np.asarray(x, dtype=np.float64) - ox) / sx + _EPS).astype(np.int64)
    row = np.floor((np.asarray(y, dtype=np.float64) - oy) / sy + _EPS).astype(np.int64)
    if col.ndim == 0:
        return int(col), int(row)
    return col, row
