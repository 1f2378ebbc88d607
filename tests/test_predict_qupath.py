"""QuPath and OME-TIFF outputs of ``histotile predict`` on the real CMU slide (bundled model).

The issue-7 schema rules on predict's own ``tiles.geojson.gz``: closed polygons inside the slide,
``objectType`` inside ``properties``, a classification with name and colour, measurement names =
the model's classes, probabilities summing to 1; coordinates round-trip to the zarr pixels and
the CSV rows. Plus ``--qupath-merge``, ``--ome-tiff`` (ome-types) and the plain/detection/
min-prob options.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import read_csv

from histotile.cli import main


def _predict(out: Path, slide: Path, *options: str) -> Path:
    from histotile.models import zoo

    assert zoo.DEFAULT_MODEL in zoo.list_models(), "the bundled model is missing"
    try:
        main(["-q", "predict", str(slide), "-o", str(out), *options])
    except SystemExit as exc:
        assert exc.code in (0, None), f"predict exited {exc.code}"
    return out / "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def qp_out(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    """Default QuPath export plus --qupath-merge and --ome-tiff."""
    return _predict(tmp_path_factory.mktemp("predict-qupath"), cmu_small, "--qupath-merge",
                    "--ome-tiff")


def _features(path: Path) -> list[dict]:
    from histotile.export.qupath import open_geojson

    with open_geojson(path) as fh:
        data = json.load(fh)
    assert data["type"] == "FeatureCollection"
    return data["features"]


def _card(folder: Path) -> tuple[dict, list[str], dict[str, list[int]]]:
    run = json.loads((folder / "run.json").read_text())
    classes = run["model"]["card"]["classes"]
    return run, [c["name"] for c in classes], {c["name"]: c["color"] for c in classes}


def check_tile_schema(features: list[dict], run: dict, names: list[str],
                      colors: dict[str, list[int]], object_type: str = "tile") -> None:
    """The issue-7 rules on every feature."""
    width, height = run["slide_info"]["width"], run["slide_info"]["height"]
    ids = set()
    for f in features:
        assert f["type"] == "Feature" and "objectType" not in f
        ids.add(str(uuid.UUID(f["id"])))
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.asarray(geom["coordinates"][0], np.float64)
        assert len(ring) == 5 and (ring[0] == ring[-1]).all()  # closed
        assert ring.min() >= 0 and ring[:, 0].max() <= width and ring[:, 1].max() <= height
        props = f["properties"]
        assert props["objectType"] == object_type and props["isLocked"] is True
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and cls["color"] == colors[cls["name"]]
        meas = props["measurements"]
        assert list(meas) == [f"prob_{n}" for n in names]
        probs = np.array([meas[f"prob_{n}"] for n in names])
        assert probs.sum() == pytest.approx(1.0, abs=len(names) * 5e-7)
        assert cls["name"] == names[int(probs.argmax())]
    assert len(ids) == len(features)


def test_tiles_geojson_schema(qp_out: Path) -> None:
    run, names, colors = _card(qp_out)
    features = _features(qp_out / "tiles.geojson.gz")
    assert len(features) == run["patches"] > 0
    check_tile_schema(features, run, names, colors)
    assert run["qupath"]["tiles_written"] == len(features)
    fp = run["fingerprint"]
    assert (fp["geojson_plain"], fp["qupath_object_type"], fp["qupath_min_prob"],
            fp["qupath_merge"]) == (False, "tile", None, True)


def test_tile_coordinates_round_trip_to_zarr_and_csv(qp_out: Path) -> None:
    from histotile.stitch import heatmap_pixel_to_level0, level0_to_heatmap_pixel, read_heatmap

    _, names, _ = _card(qp_out)
    heat, attrs = read_heatmap(qp_out / "heatmap.ome.zarr")
    rows = {(int(r["minx"]), int(r["miny"])): r for r in read_csv(qp_out / "predictions.csv")}
    features = _features(qp_out / "tiles.geojson.gz")
    assert len(features) == len(rows)
    seen = set()
    for f in features:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        (x0, y0), (x1, y1) = ring.min(axis=0).tolist(), ring.max(axis=0).tolist()
        row = rows[(x0, y0)]
        assert (x1 - x0, y1 - y0) == (int(row["width"]), int(row["height"]))
        assert f["properties"]["classification"]["name"] == row["label"]
        probs = np.array([f["properties"]["measurements"][f"prob_{n}"] for n in names])
        np.testing.assert_allclose(probs, [float(row[f"prob_{n}"]) for n in names], rtol=1e-6)
        col, r = level0_to_heatmap_pixel(x0, y0, attrs)
        assert heatmap_pixel_to_level0(col, r, attrs) == (x0, y0)  # exact, both ways
        np.testing.assert_allclose(heat[:, r, col], probs, atol=0.5 / 255 + 1e-6)
        seen.add((x0, y0))
    assert seen == set(rows)


def test_merged_classes_annotations(qp_out: Path) -> None:
    import shapely
    from shapely.geometry import shape

    run, names, colors = _card(qp_out)
    rows = read_csv(qp_out / "predictions.csv")
    features = _features(qp_out / "classes.geojson.gz")
    counts = {n: sum(r["label"] == n for r in rows) for n in names}
    assert {f["properties"]["name"] for f in features} == {n for n, c in counts.items() if c}
    side = run["grid"]["stride_level0"]
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": props["name"],
                                           "color": colors[props["name"]]}
        assert props["measurements"]["patches"] == counts[props["name"]]
        geom = shape(f["geometry"])
        assert shapely.is_valid(geom)
        assert geom.area == pytest.approx(counts[props["name"]] * side ** 2)


def test_ome_tiff_validates(qp_out: Path) -> None:
    import ome_types

    run = json.loads((qp_out / "run.json").read_text())
    ome = ome_types.from_tiff(qp_out / "heatmap.ome.tif")
    pixels = ome.images[0].pixels
    cols, rows = run["grid"]["grid_shape"]
    assert (pixels.size_x, pixels.size_y, pixels.size_c) == (cols, rows, 3)
    stride_um = run["grid"]["stride_level0"] * run["grid"]["slide_mpp"]
    assert pixels.physical_size_x == pytest.approx(stride_um)
    assert "heatmap.ome.tif" in run["files"] and "classes.geojson.gz" in run["files"]


def test_plain_detection_min_prob(tmp_path: Path, cmu_small: Path) -> None:
    folder = _predict(tmp_path, cmu_small, "--geojson-plain", "--qupath-object-type",
                      "detection", "--qupath-min-prob", "0.4")
    run, names, colors = _card(folder)
    assert (folder / "tiles.geojson").is_file() and not (folder / "tiles.geojson.gz").exists()
    features = _features(folder / "tiles.geojson")
    check_tile_schema(features, run, names, colors, object_type="detection")
    rows = read_csv(folder / "predictions.csv")
    confident = [r for r in rows if max(float(r[f"prob_{n}"]) for n in names) >= 0.4]
    assert len(features) == len(confident) < len(rows)  # the CSV keeps every patch
    assert run["qupath"]["tiles_dropped"] == len(rows) - len(confident)
