"""QuPath GeoJSON: tile objects with ``prob_<class>`` measurements, streamed (gzip by default).

QuPath (>= 0.4) reads: ``properties.objectType`` ("tile", "detection", "annotation"), a
``classification`` with ``name`` *and* ``color`` [r, g, b] (a name without colour aborts the whole
import), ``measurements`` as a JSON object, ``isLocked``, and ``.geojson.gz`` directly (drag and
drop, File > Object data > Import objects, or ``PathIO.readObjects`` in a script). Coordinates are
level-0 pixels. Feature ids are deterministic UUIDs (uuid5 of the ``id_seed``, usually the slide
name, and the tile's x,y,w,h), so a rerun writes identical files.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.export.csv import iter_predictions_csv
from histotile.fileio import AtomicTextWriter, atomic_path
from histotile.stitch import level0_to_heatmap_pixel, open_heatmap
from histotile.units import Level0Side

OBJECT_TYPES = ("tile", "detection", "annotation")
TILES_GZ, TILES_PLAIN = "tiles.geojson.gz", "tiles.geojson"
CLASSES_GZ, CLASSES_PLAIN = "classes.geojson.gz", "classes.geojson"


class _GzipText(io.TextIOWrapper):
    """UTF-8 text into a gzip file whose header holds no name and mtime 0, so the same content
    gives the same bytes on every run (``gzip.open`` stores the write time and the file name,
    here a temporary one)."""

    def __init__(self, path: Path, level: int) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        gz = gzip_module.GzipFile(filename="", mode="wb", fileobj=self._file,
                                  compresslevel=level, mtime=0)
        super().__init__(gz, encoding="utf-8")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._file.close()


def _open_text(path: Path, gz: bool, level: int = 6) -> IO[str]:
    if gz:
        return _GzipText(path, level)
    return open(path, "w", encoding="utf-8")  # caller closes


def open_geojson(path: str | Path) -> Any:
    """Open a ``.geojson`` or ``.geojson.gz`` for reading text."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip_module.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _classification(name: str, color: Sequence[int]) -> str:
    return json.dumps({"name": name, "color": [int(c) for c in color[:3]]})


def _fmt(values: np.ndarray) -> list[str]:
    """Coordinates as JSON numbers: integers when whole, else 3 decimals."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values == np.rint(values)):
        return [str(v) for v in values.astype(np.int64).tolist()]
    return [f"{v:.3f}" for v in values.tolist()]


class GeoJSONTileWriter(AtomicTextWriter):
    """Stream one GeoJSON Feature per patch into a FeatureCollection (a temporary file, renamed
    on close). Memory is bounded by the batch."""

    footer = "\n]}\n"

    def __init__(self, path: str | Path, class_names: Sequence[str],
                 class_colors: Sequence[Sequence[int]], object_type: str = "tile",
                 min_prob: float | None = None, gzip: bool = True,
                 id_seed: str | None = None, compresslevel: int = 6) -> None:
        if object_type not in OBJECT_TYPES:
            raise InvalidArgumentError(f"unknown QuPath object type {object_type!r}",
                                       f"use one of {', '.join(OBJECT_TYPES)}")
        if len(class_names) != len(class_colors):
            raise InvalidArgumentError("class names and colours differ in number",
                                       "check the model card's classes")
        super().__init__(path)
        self.class_names = list(class_names)
        self.measure_names = [json.dumps(f"prob_{n}") for n in self.class_names]
        self._classes = [_classification(n, c)
                         for n, c in zip(self.class_names, class_colors, strict=True)]
        self.object_type = object_type
        self.min_prob = min_prob
        self._ns = uuid.uuid5(uuid.NAMESPACE_URL, f"histotile:{id_seed}") if id_seed is not None \
            else None
        self._fh = _open_text(self.tmp, gzip, compresslevel)
        self._fh.write('{"type":"FeatureCollection","features":[\n')
        self.count = 0
        self.dropped = 0

    def _id(self, x: str, y: str, w: str, h: str) -> str:
        if self._ns is None:
            return str(uuid.uuid4())
        return str(uuid.uuid5(self._ns, f"{x},{y},{w},{h}"))

    def write(self, coords: np.ndarray, probs: np.ndarray, size: Level0Side | np.ndarray,
              extra: dict[str, np.ndarray] | None = None) -> None:
        """``coords`` (n, 2) level-0 top-left (x, y); ``probs`` (n, C); ``size`` the patch's
        level-0 side (scalar, (w, h) or (n, 2)); ``extra`` more measurements, e.g.
        ``{"gradcam_mean": (n,)}``."""
        coords = np.asarray(coords).reshape(-1, 2)
        probs = np.asarray(probs, dtype=np.float64).reshape(len(coords), len(self.class_names))
        wh = np.broadcast_to(np.asarray(size).reshape(-1, 2) if np.ndim(size) else
                             np.asarray([size, size]), (len(coords), 2))
        keep = np.ones(len(coords), bool)
        if self.min_prob is not None:
            keep = probs.max(axis=1) >= self.min_prob
            self.dropped += int((~keep).sum())
        labels = probs.argmax(axis=1)
        extra = extra or {}
        extra_names = list(extra)
        template = self._template(extra_names)
        cols = [coords[:, 0], coords[:, 1], coords[:, 0] + wh[:, 0], coords[:, 1] + wh[:, 1]]
        geo = np.stack([_fmt(c) for c in cols], 1)
        sizes = np.stack([_fmt(wh[:, 0]), _fmt(wh[:, 1])], 1)
        meas = np.concatenate(
            [probs] + [np.asarray(extra[k], np.float64).reshape(-1, 1) for k in extra_names],
            axis=1) if extra_names else probs
        parts = []
        for i in np.nonzero(keep)[0].tolist():
            a, b, c, d = geo[i].tolist()
            fid = self._id(a, b, *sizes[i].tolist())
            parts.append(template % (fid, a, b, c, b, c, d, a, d, a, b,
                                     self._classes[labels[i]], *meas[i].tolist()))
        if parts:
            sep = ",\n" if self.count else ""
            self._fh.write(sep + ",\n".join(parts))
            self.count += len(parts)

    def _template(self, extra_names: list[str]) -> str:
        """One %-template per feature: id, ring (10 numbers), classification, measurements."""
        names = self.measure_names + [json.dumps(k) for k in extra_names]
        meas = ",".join(f"{n.replace('%', '%%')}:%.7g" for n in names)
        ring = "[[%s,%s],[%s,%s],[%s,%s],[%s,%s],[%s,%s]]"
        return ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":['
                + ring + ']},"properties":{"objectType":"' + self.object_type
                + '","isLocked":true,"classification":%s,"measurements":{' + meas + "}}}")


def merge_classes(labels: np.ndarray, origin_level0: Any, stride_level0: Any,
                  class_names: Sequence[str], class_colors: Sequence[Sequence[int]],
                  id_seed: str | None = None) -> list[dict[str, Any]]:
    """One annotation Feature per class present in ``labels`` (rows, cols) (class index, -1 where
    nothing was predicted): the union of its heatmap cells (each ``stride_level0`` level-0 px from
    ``origin_level0 + (col,row) * stride``), an exact rectilinear (Multi)Polygon with holes.

    Rows are run-length encoded into rectangles and dissolved with shapely's ``union_all``.
    """
    import shapely
    from shapely.geometry import mapping

    ox, oy = (origin_level0 if np.ndim(origin_level0) else (origin_level0,) * 2)
    sx, sy = (stride_level0 if np.ndim(stride_level0) else (stride_level0,) * 2)
    labels = np.asarray(labels)
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"histotile:{id_seed}:classes")
    features = []
    for k, (name, color) in enumerate(zip(class_names, class_colors, strict=True)):
        boxes = []
        for row, c0, c1 in _runs(labels == k):
            y0 = oy + row * sy
            boxes.append(shapely.box(ox + c0 * sx, y0, ox + c1 * sx, y0 + sy))
        if not boxes:
            continue
        geom = shapely.union_all(boxes)
        geom = shapely.simplify(geom, 0)  # drop collinear vertices left by the union
        if geom.geom_type == "MultiPolygon" and len(geom.geoms) == 1:
            geom = geom.geoms[0]
        gj = mapping(geom)
        features.append({
            "type": "Feature", "id": str(uuid.uuid5(ns, name)),
            "geometry": _clean(gj),
            "properties": {"objectType": "annotation", "name": name, "isLocked": True,
                           "classification": {"name": name, "color": [int(c) for c in color]},
                           "measurements": {"patches": int((labels == k).sum())}},
        })
    return features


def _clean(gj: Any) -> Any:
    """Tuples to lists and whole floats to ints (smaller, exact JSON)."""
    if isinstance(gj, dict):
        return {k: _clean(v) for k, v in gj.items()}
    if isinstance(gj, (list, tuple)):
        return [_clean(v) for v in gj]
    if isinstance(gj, float) and gj.is_integer():
        return int(gj)
    return gj


def _runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start col, end col exclusive) of each horizontal run of True."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(diff == 1)
    _, ends = np.nonzero(diff == -1)
    return list(zip(rows_s.tolist(), starts.tolist(), ends.tolist(), strict=True))


def write_feature_collection(path: str | Path, features: list[dict[str, Any]],
                             gzip: bool = True) -> Path:
    """Write a small FeatureCollection atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, _open_text(tmp, gzip) as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh)
    return path


def result_classes(result_dir: Path) -> tuple[list[str], list[list[int]]]:
    """Class names and colours of a result folder: run.json ``model.card.classes``, else the
    heatmap's attributes."""
    run = result_dir / "run.json"
    if run.exists():
        data = json.loads(run.read_text())
        classes = (data.get("model") or {}).get("card", {}).get("classes")
        if classes:
            return [c["name"] for c in classes], [list(c["color"]) for c in classes]
    zarr_path = result_dir / "heatmap.ome.zarr"
    if zarr_path.exists():
        attrs = dict(open_heatmap(zarr_path).attrs["histotile"])
        return list(attrs["class_names"]), [list(c) for c in attrs["class_colors"]]
    raise InputNotFoundError(f"no run.json with model.card.classes nor heatmap in {result_dir}",
                             "point to a finished histotile predict output folder")


def result_id_seed(result_dir: Path) -> str:
    """The seed predict used for tile ids: the slide's file name (run.json ``slide`` or the
    heatmap's ``slide`` attribute), else the folder name."""
    run = result_dir / "run.json"
    if run.exists():
        slide = json.loads(run.read_text()).get("slide")
        if slide:
            return Path(str(slide)).name
    zarr_path = result_dir / "heatmap.ome.zarr"
    if zarr_path.exists():
        slide = dict(open_heatmap(zarr_path).attrs["histotile"]).get("slide")
        if slide:
            return Path(str(slide)).name
    return result_dir.name


def export_qupath(result_dir: str | Path, gzip: bool = True, object_type: str = "tile",
                  min_prob: float | None = None, merge: bool = False, tiles: bool = True,
                  id_seed: str | None = None) -> list[Path]:
    """Rebuild ``tiles.geojson(.gz)`` (and with ``merge`` ``classes.geojson(.gz)``, one annotation
    per class) from a result folder's ``predictions.csv``, streaming. Returns the written paths."""
    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise InputNotFoundError(f"no result folder {result_dir}", "run histotile predict first")
    names, colors = result_classes(result_dir)
    seed = result_id_seed(result_dir) if id_seed is None else id_seed
    written: list[Path] = []
    if tiles:
        out = result_dir / (TILES_GZ if gzip else TILES_PLAIN)
        with GeoJSONTileWriter(out, names, colors, object_type, min_prob, gzip, seed) as writer:
            for block in iter_predictions_csv(result_dir / "predictions.csv"):
                _check_names(block.class_names, names, result_dir)
                writer.write(block.coords, block.probs, block.sizes, block.extra or None)
        written.append(out)
    if merge:
        written.append(write_merged(result_dir, names, colors, gzip, seed))
    return written


def _check_names(found: list[str], names: list[str], result_dir: Path) -> None:
    if found != names:
        raise InvalidArgumentError(
            f"predictions.csv classes {found} differ from the model's {names}",
            f"the files in {result_dir} come from different runs; rerun predict")


def write_merged(result_dir: Path, names: list[str], colors: list[list[int]], gzip: bool = True,
                 id_seed: str | None = None) -> Path:
    """``classes.geojson(.gz)``: the CSV's argmax labels placed on the heatmap grid (geometry
    from ``heatmap.ome.zarr``'s attributes) and dissolved per class."""

    attrs = dict(open_heatmap(result_dir / "heatmap.ome.zarr").attrs["histotile"])
    cols, rows = attrs["grid_shape"]
    labels = np.full((rows, cols), -1, np.int16)
    lookup = {n: i for i, n in enumerate(names)}
    for block in iter_predictions_csv(result_dir / "predictions.csv"):
        c, r = level0_to_heatmap_pixel(block.coords[:, 0], block.coords[:, 1], attrs)
        labels[r, c] = [lookup[str(v)] for v in block.labels]
    feats = merge_classes(labels, attrs["origin_level0"], attrs["stride_level0"], names, colors,
                          id_seed)
    return write_feature_collection(result_dir / (CLASSES_GZ if gzip else CLASSES_PLAIN), feats,
                                    gzip)
