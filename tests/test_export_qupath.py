"""QuPath GeoJSON (issue 7): schema rules, round trips to zarr and CSV, merge, streaming memory.

Geometry from the real CMU-1-Small-Region slide; probabilities GENERATED (Dirichlet draws).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, COLORS, cmu_grid, generated_probs, write_result

from histotile.export.csv import read_predictions_csv
from histotile.export.qupath import (
    GeoJSONTileWriter,
    export_qupath,
    merge_classes,
    open_geojson,
    write_feature_collection,
)
from histotile.stitch import level0_to_heatmap_pixel, read_coverage, read_heatmap


def load(path: Path) -> list[dict]:
    with open_geojson(path) as fh:
        data = json.load(fh)
    assert data["type"] == "FeatureCollection"
    return data["features"]


@pytest.fixture(scope="module")
def cmu_result(cmu_small, tmp_path_factory):
    grid = cmu_grid(cmu_small)
    probs = generated_probs(len(grid["indices"]), seed=7)
    folder = write_result(tmp_path_factory.mktemp("out") / "CMU-1-Small-Region", grid, probs)
    return folder, grid, probs


def check_qupath_rules(features: list[dict], dims: tuple[int, int], object_type: str = "tile"):
    """The import rules of issue 7, feature by feature."""
    w, h = dims
    ids = set()
    for f in features:
        assert f["type"] == "Feature" and "objectType" not in f
        ids.add(str(uuid.UUID(f["id"])))
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.asarray(geom["coordinates"][0])
        assert len(ring) == 5 and (ring[0] == ring[-1]).all()  # closed
        assert (np.diff(ring, axis=0) == 0).any(axis=1).all()  # axis-aligned edges
        assert ring.min() >= 0 and (ring[:, 0] <= w).all() and (ring[:, 1] <= h).all()
        props = f["properties"]
        assert props["objectType"] == object_type and props["isLocked"] is True
        cls = props["classification"]
        assert cls["name"] in CLASSES and cls["color"] == list(COLORS[CLASSES.index(cls["name"])])
        meas = props["measurements"]
        assert list(meas) == [f"prob_{n}" for n in CLASSES]
        p = np.array(list(meas.values()))
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert cls["name"] == CLASSES[int(p.argmax())]
    assert len(ids) == len(features)


def test_tiles_follow_qupath_import_rules(cmu_result):
    folder, grid, probs = cmu_result
    features = load(folder / "tiles.geojson.gz")
    assert len(features) == len(probs)
    check_qupath_rules(features, grid["dimensions"])


def test_coordinates_round_trip_to_zarr_pixels_and_csv_rows(cmu_result):
    folder, grid, probs = cmu_result
    heat, attrs = read_heatmap(folder / "heatmap.ome.zarr")
    cover = read_coverage(folder / "heatmap.ome.zarr")
    table = read_predictions_csv(folder / "predictions.csv")
    rows = {(int(x), int(y)): i for i, (x, y) in enumerate(table.coords)}
    assert len(rows) == len(table) == len(probs)
    for f in load(folder / "tiles.geojson.gz"):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        (x0, y0), (x1, y1) = ring.min(axis=0), ring.max(axis=0)
        p = np.array(list(f["properties"]["measurements"].values()))
        i = rows[(int(x0), int(y0))]
        assert (table.sizes[i] == (x1 - x0, y1 - y0)).all()
        assert (table.sizes[i] == attrs["patch_size_level0"]).all()
        np.testing.assert_array_equal(table.probs[i], p)
        assert table.labels[i] == f["properties"]["classification"]["name"]
        col, row = level0_to_heatmap_pixel(x0, y0, attrs)
        assert cover[row, col]
        np.testing.assert_allclose(heat[:, row, col], p, atol=0.5 / 255 + 1e-6)


def test_export_qupath_rebuilds_identical_tiles(cmu_result, tmp_path):
    folder, grid, _ = cmu_result
    copy = tmp_path / folder.name
    copy.mkdir()
    for name in ("predictions.csv", "run.json"):
        (copy / name).write_bytes((folder / name).read_bytes())
    [out] = export_qupath(copy)
    assert out.name == "tiles.geojson.gz"
    assert load(out) == load(folder / "tiles.geojson.gz")  # deterministic uuid5 ids too
    [plain] = export_qupath(copy, gzip=False, object_type="detection", min_prob=0.6)
    assert plain.name == "tiles.geojson"
    kept = load(plain)
    check_qupath_rules(kept, grid["dimensions"], object_type="detection")
    maxp = read_predictions_csv(copy / "predictions.csv").probs.max(axis=1)
    assert len(kept) == int((maxp >= 0.6).sum()) < len(maxp)


def test_classes_fall_back_to_heatmap_attributes(cmu_result, tmp_path):
    import shutil

    folder, _, _ = cmu_result
    copy = tmp_path / "no-run-json"
    shutil.copytree(folder, copy)
    (copy / "run.json").unlink()
    (copy / "tiles.geojson.gz").unlink()
    [out] = export_qupath(copy, id_seed=f"{folder.name}.svs")
    assert load(out) == load(folder / "tiles.geojson.gz")


def test_merged_classes_are_exact_dissolved_cells(cmu_result):
    import shapely
    from shapely.geometry import shape

    folder, grid, probs = cmu_result
    out = export_qupath(folder, merge=True, tiles=False)[0]
    assert out.name == "classes.geojson.gz"
    features = load(out)
    stride = grid["attrs"]["stride_level0"]
    labels = probs.argmax(axis=1)
    assert {f["properties"]["classification"]["name"] for f in features} == \
        {CLASSES[k] for k in set(labels.tolist())}
    union = []
    for f in features:
        assert f["properties"]["objectType"] == "annotation"
        geom = shape(f["geometry"])
        assert geom.is_valid and f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        k = CLASSES.index(f["properties"]["classification"]["name"])
        assert geom.area == (labels == k).sum() * stride**2
        for (x, y) in grid["coords"][labels == k][:20]:
            assert geom.contains(shapely.Point(x + stride / 2, y + stride / 2))
        union.append(geom)
    assert shapely.union_all(union).area == len(probs) * stride**2


def test_merge_keeps_holes_and_diagonal_neighbours_apart():
    """Generated label raster: a ring with a hole, and two cells touching at a corner."""
    labels = np.full((6, 7), -1)
    labels[0:5, 0:5] = 0
    labels[2, 2] = -1  # hole
    labels[5, 5] = 1
    labels[4, 6] = 1  # touches (5,5) only at a corner
    from shapely.geometry import shape

    feats = merge_classes(labels, (100, 50), 10, ["a", "b"], [(1, 2, 3), (4, 5, 6)])
    a, b = (shape(f["geometry"]) for f in feats)
    assert a.geom_type == "Polygon" and len(a.interiors) == 1 and a.area == 24 * 100
    assert a.is_valid and set(np.asarray(a.exterior.coords).ravel()) <= set(range(0, 200, 10))
    assert len(a.exterior.coords) == 5  # a square ring: collinear vertices dropped
    assert b.geom_type == "MultiPolygon" and len(b.geoms) == 2 and b.is_valid


@pytest.mark.slow  # 200k tiles: ~9 s quiet, ~35 s busy
def test_200k_tiles_stream_with_bounded_memory(tmp_path):
    """200,000 generated tiles: peak RSS growth stays far below the ~100 MB of GeoJSON text a
    non-streaming writer would hold (measured by ru_maxrss in a fresh process: tracemalloc's
    per-allocation hooks make this 8x slower)."""
    out = tmp_path / "tiles.geojson.gz"
    code = f"""
import resource, numpy as np
from histotile.export.qupath import GeoJSONTileWriter
names = [f"class{{i}}" for i in range(9)]
rng = np.random.default_rng(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with GeoJSONTileWriter({str(out)!r}, names, [(i, 2 * i, 3 * i) for i in range(9)],
                       id_seed="big") as w:
    for s in range(0, 200_000, 2048):
        i = np.arange(s, min(s + 2048, 200_000))
        w.write(np.stack([i % 450 * 224, i // 450 * 224], 1), rng.dirichlet(np.ones(9), len(i)),
                224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, w.count)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, count = (int(v) for v in res.stdout.split())
    assert count == 200_000
    growth_mb = (after - before) / 1024
    assert growth_mb < 40, f"RSS grew by {growth_mb:.0f} MB while writing 200k tiles"
    text_mb = 0
    lines = 0
    with open_geojson(out) as fh:
        first = fh.readline()
        for line in fh:
            text_mb += len(line) / 1e6
            lines += 1
            if lines == 1:
                feature = json.loads(line.rstrip().rstrip(","))
    assert first.startswith('{"type":"FeatureCollection"') and lines == 200_001  # + closing line
    assert text_mb > 2 * 40  # what a non-streaming writer would hold, at the very least
    assert feature["properties"]["objectType"] == "tile"


def test_bad_writer_arguments_raise_clear_errors(tmp_path):
    from histotile.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="object type"):
        GeoJSONTileWriter(tmp_path / "t.geojson", CLASSES, COLORS, object_type="cell")
    with pytest.raises(InvalidArgumentError, match="colours"):
        GeoJSONTileWriter(tmp_path / "t.geojson", CLASSES, COLORS[:2])
    from histotile.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError):
        export_qupath(tmp_path / "missing")


def test_issue17_item15_tiles_geojson_gz_is_byte_identical_across_runs(tmp_path, monkeypatch):
    """gzip stored the write time (and the temporary file's name) in its header, so two runs
    wrote different bytes; now the header holds mtime 0 and no name."""
    import gzip
    import time

    coords = np.array([[0, 0], [224, 0], [448, 224]])
    probs = generated_probs(3)
    outputs = []
    for run, clock in enumerate((1_000_000.0, 2_000_000.0)):
        monkeypatch.setattr(time, "time", lambda clock=clock: clock)
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        with GeoJSONTileWriter(folder / "tiles.geojson.gz", CLASSES, COLORS,
                               id_seed="slide.svs") as tiles:
            tiles.write(coords, probs, 224)
        features = merge_classes(np.array([[0, 1], [-1, 1]]), (0, 0), 224, CLASSES, COLORS,
                                 id_seed="slide.svs")
        merged = write_feature_collection(folder / "classes.geojson.gz", features)
        outputs.append([(folder / "tiles.geojson.gz").read_bytes(), merged.read_bytes()])
    monkeypatch.undo()
    assert outputs[0] == outputs[1]
    head = outputs[0][0][:10]
    assert head[3] == 0 and head[4:8] == b"\0\0\0\0"  # no name flag, mtime 0
    assert len(load(tmp_path / "run0" / "tiles.geojson.gz")) == 3
    with gzip.open(tmp_path / "run1" / "tiles.geojson.gz", "rt") as fh:
        assert json.load(fh)["type"] == "FeatureCollection"
