"""Editable tissue masks: ``tissue.geojson`` written by tile/predict, read back by --tissue-mask.

Real slide: CMU-1-Small-Region.svs (the ``cmu_small`` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import shapely
from helpers import make_untrained_model, read_csv, run_cli
from shapely.geometry import mapping, shape

from histotile.annotations import rasterize, read_annotations
from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.export.tissue_geojson import mask_polygons
from histotile.options import PredictOptions, TileOptions
from histotile.tiling import tile, tile_slide

STEM = "CMU-1-Small-Region"


def _coords(archive: Path) -> np.ndarray:
    with h5py.File(archive, "r") as h5:
        return np.asarray(h5["coords"])


def _keys(coords: np.ndarray) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in coords}


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    """``tile`` with automatic detection: the archive, its tissue.png and tissue.geojson."""
    out = tmp_path_factory.mktemp("tile-detected")
    tile_slide(cmu_small, out)
    return out


def test_mask_polygons_round_trip_keeps_holes_and_every_pixel() -> None:
    mask = np.zeros((60, 80), bool)
    mask[5:40, 5:50] = True
    mask[15:25, 15:30] = False  # a hole
    mask[18:21, 20:23] = True  # an island inside the hole
    mask[50:55, 60:79] = True  # a second piece touching nothing
    mask[0, 79] = True  # a lone corner pixel
    for ds in (1.0, 16.25, 33.0):
        polys = mask_polygons(mask, ds)
        assert len(polys) == 4 and sum(len(p.interiors) for p in polys) == 1
        assert np.array_equal(rasterize(shapely.MultiPolygon(polys), mask.shape, ds), mask)


def test_tile_writes_tissue_geojson_that_qupath_imports(detected: Path) -> None:
    data = json.loads((detected / f"{STEM}.tissue.geojson").read_text())
    assert data["type"] == "FeatureCollection" and data["features"]
    for f in data["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "Tissue"
        assert len(props["classification"]["color"]) == 3  # QuPath aborts without a colour
        assert f["geometry"]["type"] == "Polygon" and f["id"]
        assert shape(f["geometry"]).is_valid
    # level-0 coordinates: the slide is 2220 x 2967; the mask's last pixels (16 level-0 px at
    # 8 um/px) may reach past its edge
    bounds = read_annotations(detected / f"{STEM}.tissue.geojson").union().bounds
    assert bounds[0] >= 0 and bounds[1] >= 0 and bounds[2] <= 2220 + 16 and bounds[3] <= 2967 + 16
    assert bounds[2] - bounds[0] > 1000 and bounds[3] - bounds[1] > 1000


def test_tissue_mask_round_trip_gives_the_same_patches(detected: Path, cmu_small: Path,
                                                       tmp_path: Path) -> None:
    """write -> read back -> the same kept grid (same coords, same tissue fractions)."""
    back = tile_slide(cmu_small, tmp_path, tissue_mask=detected / f"{STEM}.tissue.geojson")
    assert back.n_patches > 20
    assert np.array_equal(_coords(back.archive), _coords(detected / f"{STEM}.h5"))
    with h5py.File(back.archive, "r") as a, h5py.File(detected / f"{STEM}.h5", "r") as b:
        assert np.array_equal(a["tissue_fraction"][:], b["tissue_fraction"][:])
        assert a.attrs["mask_sha256"] and a.attrs["mask_file"].endswith("tissue.geojson")
    # and the mask written again from the read mask is the same file content
    again = json.loads((tmp_path / f"{STEM}.tissue.geojson").read_text())
    first = json.loads((detected / f"{STEM}.tissue.geojson").read_text())
    assert again["features"] == first["features"]


def test_edited_tissue_mask_changes_exactly_the_expected_patches(detected: Path,
                                                                 cmu_small: Path,
                                                                 tmp_path: Path) -> None:
    """A region removed (a pen mark) and a fragment added (missed tissue), as a pathologist would
    in QuPath: the patches inside the removed region go, those inside the fragment come, the rest
    stays."""
    with h5py.File(detected / f"{STEM}.h5", "r") as h5:
        old = np.asarray(h5["coords"])
        size = float(h5.attrs["patch_size_level0"])
    tissue = read_annotations(detected / f"{STEM}.tissue.geojson").union()
    # removed: the 3 x 3 block of kept patches around the middle one
    cx, cy = old[len(old) // 2]
    removed = shapely.box(cx - size, cy - size, cx + 2 * size, cy + 2 * size)
    # added: a 2 x 2 patch block on glass (no tissue under it), on the grid
    step = size
    glass = None
    for gx in np.arange(0, 2220 - 2 * step, step):
        for gy in np.arange(0, 2967 - 2 * step, step):
            box = shapely.box(gx, gy, gx + 2 * step, gy + 2 * step)
            if not box.buffer(step).intersects(tissue):
                glass = box
                break
        if glass is not None:
            break
    assert glass is not None, "the sample slide has a glass area"
    edited = tissue.difference(removed).union(glass)
    features = [{"type": "Feature", "geometry": mapping(p),
                 "properties": {"objectType": "annotation",
                                "classification": {"name": "Tissue", "color": [0, 200, 0]}}}
                for p in getattr(edited, "geoms", [edited])]
    features.append({"type": "Feature", "geometry": mapping(removed.buffer(-5)),
                     "properties": {"objectType": "annotation",
                                    "classification": {"name": "Pen", "color": [0, 0, 255]}}})
    path = tmp_path / "edited.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    new = _coords(tile_slide(cmu_small, tmp_path / "out", tissue_mask=path).archive)
    old_keys, new_keys = _keys(old), _keys(new)

    def inside(region: object, xy: tuple[int, int]) -> bool:
        return region.contains(shapely.box(xy[0], xy[1], xy[0] + size, xy[1] + size))

    margin = 20.0  # one mask pixel is ~16 level-0 px
    near_removed, near_glass = removed.buffer(margin), glass.buffer(margin)
    gone, came = old_keys - new_keys, new_keys - old_keys
    assert gone and came
    assert all(near_removed.intersects(shapely.box(x, y, x + size, y + size)) for x, y in gone)
    assert all(near_glass.intersects(shapely.box(x, y, x + size, y + size)) for x, y in came)
    assert not any(inside(removed, xy) for xy in new_keys)  # the pen mark is gone
    assert sum(inside(glass, xy) for xy in new_keys) == 4  # the 2 x 2 fragment came
    far = {xy for xy in old_keys
           if not near_removed.intersects(shapely.box(xy[0], xy[1], xy[0] + size, xy[1] + size))}
    assert far <= new_keys  # everything away from the edits is unchanged


def test_tissue_mask_folder_is_matched_by_slide_and_fingerprinted(detected: Path,
                                                                  cmu_small: Path,
                                                                  tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / f"{STEM}.geojson").write_text((detected / f"{STEM}.tissue.geojson").read_text())
    out = tmp_path / "out"
    first = tile([cmu_small], out, tissue_mask=str(masks), progress=False)
    assert [r.status for r in first.results] == ["done"]
    run = json.loads((out / f"{STEM}.run.json").read_text())
    assert run["fingerprint"]["tissue_mask"] == {
        f"{STEM}.geojson": read_annotations(masks / f"{STEM}.geojson").sha256}
    again = tile([cmu_small], out, tissue_mask=str(masks), progress=False)
    assert [r.status for r in again.results] == ["skipped"]
    data = json.loads((masks / f"{STEM}.geojson").read_text())
    fragment = {"type": "Feature", "geometry": mapping(shapely.box(0, 0, 300, 300)),
                "properties": {"objectType": "annotation"}}  # unclassified: tissue too
    data["features"].append(fragment)  # the pathologist added a missed fragment
    (masks / f"{STEM}.geojson").write_text(json.dumps(data))
    edited = tile([cmu_small], out, tissue_mask=str(masks), progress=False)
    assert [r.status for r in edited.results] == ["done"]


def test_tissue_mask_folder_without_the_slide_is_refused(cmu_small: Path, tmp_path: Path
                                                         ) -> None:
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "another-slide.geojson").write_text('{"type":"FeatureCollection",'
                                                              '"features":[]}')
    with pytest.raises(InputNotFoundError, match="no tissue mask for CMU-1-Small-Region.svs"):
        tile_slide(cmu_small, tmp_path / "out", tissue_mask=tmp_path / "masks")
    with pytest.raises(InvalidArgumentError, match="--tissue-mask"):
        TileOptions(tissue_mask=str(tmp_path / "missing.geojson"))
    with pytest.raises(InvalidArgumentError, match="--tissue-mask"):
        PredictOptions(tissue_mask=str(tmp_path / "missing.geojson"))
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not readable GeoJSON"):
        tile_slide(cmu_small, tmp_path / "out", tissue_mask=tmp_path / "broken.geojson")


@pytest.mark.slow  # > 10 s on 2 cores
def test_predict_writes_tissue_geojson_and_reads_it_back(cmu_small: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """predict -> OUT/<stem>/tissue.geojson; predict --tissue-mask OUT (the folder of the first
    run) -> the same patches, recorded in run.json and its fingerprint."""
    model = make_untrained_model(tmp_path / "model")
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(first), "--model",
                            str(model), "--device", "cpu", "--stain-norm", "none"], capsys)
    assert code == 0, err
    mask = first / STEM / "tissue.geojson"
    assert mask.is_file() and "tissue.geojson" in json.loads(
        (first / STEM / "run.json").read_text())["files"]
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(second), "--model",
                            str(model), "--device", "cpu", "--stain-norm", "none",
                            "--tissue-mask", str(first)], capsys)
    assert code == 0, err
    rows = [[r["minx"], r["miny"]] for r in read_csv(first / STEM / "predictions.csv")]
    back = [[r["minx"], r["miny"]] for r in read_csv(second / STEM / "predictions.csv")]
    assert rows == back and len(rows) > 20
    run = json.loads((second / STEM / "run.json").read_text())
    assert run["tissue"]["method"] == "geojson"
    assert run["tissue"]["mask_file"] == str(mask.resolve())
    assert run["options"]["tissue_mask"] == str(first.resolve()) or \
        str(first.resolve()) in json.dumps(run)
    sha = read_annotations(mask).sha256
    assert run["fingerprint"]["tissue_mask"] == {f"{STEM}/tissue.geojson": sha}


def _skimage_rasterize(geometry, shape, downsample):
    """The earlier rasterize: skimage's per-pixel crossing test, one ring at a time (cost:
    bounding-box pixels × vertices, ~6 s on the tissue outline of a 20,000² slide)."""
    from skimage.draw import polygon as fill

    mask = np.zeros(shape, bool)
    for poly in getattr(geometry, "geoms", [geometry]):
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords, np.float64)
            rr, cc = fill(xy[:, 1] / downsample - 0.5, xy[:, 0] / downsample - 0.5, shape)
            mask[rr, cc] ^= True
    return mask


def test_rasterize_matches_the_per_pixel_crossing_test() -> None:
    """GENERATED polygons: random stars (edges through pixel centres, vertices on integer and
    half-integer positions, horizontal edges, parts outside the mask, holes) give the same
    pixels as skimage's per-pixel fill that rasterize replaced."""
    rng = np.random.default_rng(7)
    shape = (61, 83)
    for trial in range(60):
        n = int(rng.integers(3, 40))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(3, 45, n)
        cx, cy = rng.uniform(-10, 90), rng.uniform(-10, 70)
        xy = np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]
        if trial % 3 == 0:
            xy = np.round(xy * 2) / 2  # half-integer vertices: ties on pixel centres
        if trial % 3 == 1:
            xy[:, 1] = np.round(xy[:, 1])  # horizontal edges and integer rows
        ds = (1.0, 2.0, 0.5)[trial % 3]
        shell = shapely.Polygon(xy * ds)
        if not shell.is_valid or shell.area == 0:
            continue
        hole = shell.centroid.buffer(2.5 * ds, quad_segs=3)
        geom = shell.difference(hole) if shell.contains(hole) else shell
        geom = shapely.MultiPolygon([geom, shapely.box(0, 0, 4 * ds, 3 * ds)]) \
            if trial % 4 == 0 and not geom.intersects(shapely.box(0, 0, 4 * ds, 3 * ds)) else geom
        assert np.array_equal(rasterize(geom, shape, ds), _skimage_rasterize(geom, shape, ds)), \
            trial
