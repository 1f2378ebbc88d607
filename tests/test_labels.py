"""Training labels from QuPath annotations: tile --labels -> labelled archives -> train split by
slide -> predict. Real slide: CMU-1-Small-Region.svs, under two names (two "slides"), with
annotations drawn by code (rectangles, so the expected labels are plain arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import read_csv, run_cli

from histotile.errors import DatasetError, InputNotFoundError
from histotile.labels import label_patches
from histotile.options import TileOptions
from histotile.tiling import tile, tile_slide
from histotile.training.datasets import load_dataset
from histotile.training.labelled import split_by_slide

PATCH, MPP = 48, 2.0  # 192 level-0 px per patch on the CMU slide (0.499 um/px)
# level-0 rectangles (x0, y0, x1, y1); tumor and stroma overlap on x in [1100, 1300)
TUMOR = (300.0, 200.0, 1300.0, 2000.0)
STROMA = (1100.0, 200.0, 2200.0, 2000.0)


def _feature(rect: tuple[float, ...], name: str | None, color: list[int]) -> dict:
    x0, y0, x1, y1 = rect
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": color}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}, "properties": props}


def _annotations(path: Path, tumor: tuple | None = TUMOR) -> Path:
    features = [_feature(STROMA, "Stroma", [0, 150, 0]),
                _feature((0, 0, 250, 250), None, [0, 0, 0])]  # unclassified: labels nothing
    if tumor is not None:
        features.append(_feature(tumor, "Tumor", [200, 0, 0]))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _fraction(coords: np.ndarray, size: float, rect: tuple[float, ...]) -> np.ndarray:
    x0, y0, x1, y1 = rect
    w = np.clip(np.minimum(coords[:, 0] + size, x1) - np.maximum(coords[:, 0], x0), 0, None)
    h = np.clip(np.minimum(coords[:, 1] + size, y1) - np.maximum(coords[:, 1], y0), 0, None)
    return w * h / size**2


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for name in ("slideA.svs", "slideB.svs"):
        (folder / name).symlink_to(cmu_small)
    ann = folder / "annotations"
    ann.mkdir()
    _annotations(ann / "slideA.geojson")
    _annotations(ann / "slideB.svs.geojson")  # QuPath's image name keeps the extension
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, two_slides: Path) -> Path:
    out = tmp_path_factory.mktemp("labelled")
    summary = tile([two_slides / "slideA.svs", two_slides / "slideB.svs"], out,
                   TileOptions(patch_size=PATCH, mpp=MPP, labels=str(two_slides / "annotations")),
                   progress=False)
    assert summary.exit_code == 0, [r.error for r in summary.results]
    return out


def test_tile_labels_follow_the_stated_rule(labelled: Path, two_slides: Path,
                                            tmp_path: Path) -> None:
    """A tissue patch is labelled when >= 0.5 of it is inside one class; >= 0.5 inside two ->
    dropped; unannotated tissue -> left out. Checked against rectangle arithmetic on the grid
    tiled without labels."""
    plain = tile_slide(two_slides / "slideA.svs", tmp_path, patch_size=PATCH, mpp=MPP)
    with h5py.File(plain.archive, "r") as h5:
        tissue = np.asarray(h5["coords"])
        size = float(h5.attrs["patch_size_level0"])
    ft, fs = _fraction(tissue, size, TUMOR), _fraction(tissue, size, STROMA)
    expected = {}
    for (x, y), a, b in zip(tissue.tolist(), ft, fs, strict=True):
        if (a >= 0.5) != (b >= 0.5):
            expected[(x, y)] = "Tumor" if a >= 0.5 else "Stroma"
    assert np.sum((ft >= 0.5) & (fs >= 0.5)) > 0, "the overlap band drops some patches"
    assert np.sum((ft < 0.5) & (fs < 0.5)) > 0, "some tissue is unannotated"
    with h5py.File(labelled / "slideA.h5", "r") as h5:
        names = json.loads(h5.attrs["class_names"])
        y = np.asarray(h5["y"])
        got = {(int(x), int(yy)): names[int(v)]
               for (x, yy), v in zip(np.asarray(h5["coords"]), y.reshape(-1), strict=True)}
        assert names == ["Stroma", "Tumor"] and y.shape == (len(got), 1, 1, 1)
        assert y.dtype == np.uint8 and h5.attrs["slide_name"] == "slideA"
        assert h5.attrs["labels_dropped_overlap"] == int(np.sum((ft >= 0.5) & (fs >= 0.5)))
        assert h5["x"].shape[0] == len(got)
    assert got == expected and {"Tumor", "Stroma"} == set(got.values())
    with h5py.File(labelled / "slideB.h5", "r") as h5:
        assert h5.attrs["slide_name"] == "slideB"
        assert h5.attrs["labels_source"] == "slideB.svs.geojson"


def test_label_min_fraction_changes_the_rule_threshold() -> None:
    import shapely

    from histotile.annotations import Annotations

    ann = Annotations(Path("a.geojson"), "0", {"A": shapely.box(0, 0, 70, 100),
                                               "B": shapely.box(60, 0, 200, 100)})
    coords = np.array([[0, 0], [100, 0]])  # patch 0: 70% A, 40% B; patch 1: 100% B
    strict = label_patches(ann, coords, 100.0, 0.5)
    assert strict.keep.tolist() == [0, 1] and strict.y.tolist() == [0, 1]
    loose = label_patches(ann, coords, 100.0, 0.4)  # patch 0 reaches 0.4 in both: dropped
    assert loose.keep.tolist() == [1] and loose.dropped_overlap == 1
    assert label_patches(ann, coords, 100.0, 0.8).keep.tolist() == [1]


def test_split_by_slide_never_puts_one_slide_on_both_sides() -> None:
    slides = np.repeat(np.array([f"s{i}" for i in range(7)]), [5, 30, 2, 11, 9, 1, 20])
    for seed in range(5):
        tr, va, held = split_by_slide(slides, 0.3, seed)
        assert set(slides[tr]).isdisjoint(slides[va]) and set(slides[va]) == set(held)
        assert len(tr) + len(va) == len(slides) and held
    with pytest.raises(DatasetError, match="at least 2 slides"):
        split_by_slide(np.array(["one"] * 10), 0.2, 0)


def test_labelled_archives_load_split_by_slide(labelled: Path) -> None:
    data = load_dataset(labelled, val_fraction=0.5, seed=0)
    assert data.class_names == ["Stroma", "Tumor"] and data.patch_size == PATCH
    assert "by slide" in data.val_source

    def slides_of(subset: object) -> set[int]:
        return {int(np.searchsorted(subset.base.starts, i, side="right")) - 1
                for i in subset.indices}

    assert len(slides_of(data.train)) == 1 and slides_of(data.train).isdisjoint(
        slides_of(data.val))
    img, label = data.train[0]
    assert img.shape == (PATCH, PATCH, 3) and label in (0, 1)
    with pytest.raises(DatasetError, match="at least 2 slides"):
        load_dataset(labelled / "slideA.h5")


def test_missing_annotations_for_a_slide_are_refused(two_slides: Path, tmp_path: Path) -> None:
    empty = tmp_path / "ann"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match="no annotations for slideA.svs"):
        tile_slide(two_slides / "slideA.svs", tmp_path, patch_size=PATCH, mpp=MPP, labels=empty)


@pytest.mark.slow  # > 10 s on 2 cores
def test_tile_labels_train_by_slide_then_predict(labelled: Path, two_slides: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The loop end to end: labelled archives -> train (1 epoch, split by slide) -> predict."""
    model = tmp_path / "model"
    code, _, err = run_cli(["-q", "train", str(labelled), "-o", str(model), "--arch", "smallcnn",
                            "--epochs", "1", "--val-fraction", "0.5", "--device", "cpu",
                            "--no-augment"], capsys)
    assert code == 0, err
    card = json.loads((model / "model.json").read_text())
    assert [c["name"] for c in card["classes"]] == ["Stroma", "Tumor"]
    assert "by slide" in card["training"]["val_split"]
    code, _, err = run_cli(["-q", "predict", str(two_slides / "slideA.svs"), "-o",
                            str(tmp_path / "pred"), "--model", str(model), "--device", "cpu"],
                           capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "pred" / "slideA" / "predictions.csv")
    assert rows and {r["label"] for r in rows} <= {"Stroma", "Tumor"}
    assert set(rows[0]) >= {"prob_Stroma", "prob_Tumor"}


def test_cv_over_labelled_archives_is_refused(labelled: Path, tmp_path: Path) -> None:
    """k-fold CV draws folds over patches: with slide-labelled archives it would mix slides."""
    from histotile import train
    from histotile.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="--cv"):
        train(labelled, tmp_path / "m", epochs=1, cv=3, device="cpu", progress=False,
              val_fraction=0.5)
    assert not (tmp_path / "m" / "weights.safetensors").exists()


def test_read_annotations_accepts_qupath_export_variants(tmp_path: Path) -> None:
    """A bare list of features (older QuPath), .geojson.gz, a self-intersecting hand-drawn
    outline (repaired), MultiPolygons, and lines/points (no area: skipped)."""
    import gzip

    from histotile.annotations import read_annotations

    bowtie = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]},
        "properties": {"classification": {"name": "Tumor", "color": [1, 2, 3]}}}
    multi = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[200, 0], [300, 0], [300, 100], [200, 0]]], [[[400, 0], [500, 0], [500, 100],
                                                        [400, 0]]]]},
        "properties": {"classification": {"name": "Stroma", "color": [1, 2, 3]}}}
    line = {"type": "Feature", "geometry": {"type": "LineString",
                                            "coordinates": [[0, 0], [5, 5]]}, "properties": {}}
    path = tmp_path / "a.geojson.gz"
    with gzip.open(path, "wt") as fh:
        json.dump([bowtie, multi, line], fh)
    ann = read_annotations(path)
    assert sorted(ann.by_class) == ["Stroma", "Tumor"] and ann.skipped == 1
    assert ann.by_class["Tumor"].is_valid and ann.by_class["Tumor"].area == pytest.approx(5000)
    assert ann.by_class["Stroma"].area == pytest.approx(10000)
