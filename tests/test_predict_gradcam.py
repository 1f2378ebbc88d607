"""``histotile predict --gradcam`` on the real CMU slide with the bundled default model.

The stitched ``gradcam`` image of ``heatmap.ome.zarr`` is checked against Grad-CAM run on single
patches read alone (read_region + resize + the recorded stain fit), and validated as NGFF.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import read_csv, run_cli

from histotile.cli import main


def _default_model() -> str:
    from histotile.models import zoo

    assert zoo.DEFAULT_MODEL in zoo.list_models(), "the bundled model is missing"
    return zoo.DEFAULT_MODEL


@pytest.fixture(scope="module")
def cam_out(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    """One ``predict --gradcam`` run (default model, default --cam-resolution); the slide folder."""
    _default_model()
    out = tmp_path_factory.mktemp("predict-gradcam")
    try:
        main(["-q", "predict", str(cmu_small), "-o", str(out), "--gradcam"])
    except SystemExit as exc:
        assert exc.code in (0, None), f"predict exited {exc.code}"
    return out / "CMU-1-Small-Region"


def test_gradcam_outputs_and_run_json(cam_out: Path) -> None:
    from PIL import Image

    run = json.loads((cam_out / "run.json").read_text())
    cam = run["gradcam"]
    assert cam["cam_class"] == "predicted" and cam["cam_resolution_asked"] is None
    # default: patch_size_level0 / 8 level-0 px per CAM pixel (8 x 8 CAM pixels per patch)
    assert cam["cam_resolution_level0"] == pytest.approx(run["grid"]["patch_size_level0"] / 8,
                                                         abs=0.5)
    fp = run["fingerprint"]
    assert (fp["gradcam"], fp["cam_class"], fp["cam_layer"], fp["cam_resolution"]) == (
        True, "predicted", None, None)
    assert "gradcam_overlay.png" in run["files"]
    png = Image.open(cam_out / "gradcam_overlay.png")
    assert png.size[0] > 300 and png.size[1] > 300
    assert (cam_out / "gradcam_overlay.png").stat().st_size > 5_000


def test_gradcam_image_validates_as_ome_zarr(cam_out: Path) -> None:
    import zarr
    from ome_zarr_models.v04 import Image

    root = zarr.open_group(str(cam_out / "heatmap.ome.zarr"), mode="r", zarr_format=2)
    Image.from_zarr(root)
    image = Image.from_zarr(root["gradcam"])
    assert [c.label for c in image.attributes.omero.channels] == ["Grad-CAM (predicted class)"]
    attrs = dict(root["gradcam"].attrs["histotile"])
    run = json.loads((cam_out / "run.json").read_text())
    assert attrs["cam_scale"] == pytest.approx(run["gradcam"]["cam_scale"]) and attrs[
        "cam_scale"] > 0


def _cam_alone(run: dict, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(raw Grad-CAM (h, w), probs) of one patch read alone and stained with the recorded fit."""
    import torch

    from histotile.gradcam import GradCAM, resolve_layer
    from histotile.models.loading import load_model, preprocess
    from histotile.patches import resize_patch
    from histotile.slide import open_slide
    from histotile.stain import StainFit, make_normalizer

    x, y, w, h = (int(row[k]) for k in ("minx", "miny", "width", "height"))
    with open_slide(run["slide"]) as slide:
        pixels = slide.read_region((x, y), 0, (w, h))
    patch = resize_patch(pixels, run["grid"]["patch_size"])[None]
    card = run["model"]["card"]
    if run["stain"]["method"] != "none":  # the bundled model (trained on raw patches): none
        fit = run["stain"]["fit"]
        normalizer = make_normalizer("macenko", reference=card["stain"]["reference"],
                                     channels_last=True)
        stain_fit = StainFit(torch.tensor(fit["stain_matrix"], dtype=torch.float32),
                             torch.tensor(fit["max_concentrations"], dtype=torch.float32))
        patch = np.ascontiguousarray(normalizer.normalize(patch, stain_fit), dtype=np.uint8)
    loaded = load_model(run["model"]["folder"], "cpu")
    cam = GradCAM(loaded.module, resolve_layer(loaded.module, None, card["architecture"]["name"]))
    maps, probs = cam(preprocess(torch.from_numpy(patch), loaded.card, "cpu"), "predicted",
                      normalise="none", size=0)
    return maps[0].numpy(), probs[0].numpy()


def test_stitched_map_at_a_patch_equals_single_patch_cam(cam_out: Path) -> None:
    from histotile.resample import upsample_maps as upsample_cams
    from histotile.stitch import level0_to_heatmap_pixel, read_gradcam, read_heatmap

    run = json.loads((cam_out / "run.json").read_text())
    rows = read_csv(cam_out / "predictions.csv")
    values, cover, attrs = read_gradcam(cam_out / "heatmap.ome.zarr")
    _, heat_attrs = read_heatmap(cam_out / "heatmap.ome.zarr")
    block = run["gradcam"]["block"]
    assert attrs["patch_footprint_px"] == block  # no overlap: a patch is exactly its block
    scale = attrs["cam_scale"]
    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        raw, probs = _cam_alone(run, row)
        names = [c["name"] for c in run["model"]["card"]["classes"]]
        np.testing.assert_allclose([float(row[f"prob_{n}"]) for n in names], probs, atol=2e-5)
        assert float(row["gradcam_mean"]) == pytest.approx(raw.mean(), rel=1e-4, abs=1e-6)
        col, r = level0_to_heatmap_pixel(int(row["minx"]), int(row["miny"]), heat_attrs)
        got = values[r * block:(r + 1) * block, col * block:(col + 1) * block]
        assert cover[r * block:(r + 1) * block, col * block:(col + 1) * block].all()
        want = np.minimum(upsample_cams(raw[None], block)[0], scale)
        np.testing.assert_allclose(got, want, atol=scale / 255 / 2 + 1e-4 * scale)


def test_gradcam_mean_in_geojson_equals_csv(cam_out: Path) -> None:
    rows = {(r["minx"], r["miny"]): float(r["gradcam_mean"])
            for r in read_csv(cam_out / "predictions.csv")}
    with gzip.open(cam_out / "tiles.geojson.gz", "rt") as fh:
        features = json.load(fh)["features"]
    assert len(features) == len(rows)
    for f in features:
        x0, y0 = f["geometry"]["coordinates"][0][0]
        meas = f["properties"]["measurements"]
        assert meas["gradcam_mean"] == pytest.approx(rows[(str(x0), str(y0))], rel=1e-6)


def test_gradcam_options_are_in_the_fingerprint() -> None:
    from histotile.inference import fingerprint_for
    from histotile.options import PredictOptions

    base = PredictOptions(model=_default_model(), device="cpu")
    plain = fingerprint_for(base)
    cam = fingerprint_for(base.replace(gradcam=True))
    other = fingerprint_for(base.replace(gradcam=True, cam_resolution=16))
    qupath = fingerprint_for(base.replace(qupath_merge=True))
    tiff = fingerprint_for(base.replace(ome_tiff=True))
    assert len({json.dumps(f, sort_keys=True) for f in (plain, cam, other, qupath, tiff)}) == 5


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace:FutureWarning")
def test_torchscript_model_gradcam_is_one_line(tmp_path: Path, cmu_small: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A GENERATED TorchScript copy of the bundled model: --gradcam is refused up front."""
    import torch

    from histotile.download import file_digest
    from histotile.models.loading import load_model

    loaded = load_model(_default_model(), "cpu")
    folder = tmp_path / "generated-torchscript"
    shutil.copytree(loaded.folder, folder)
    weights = folder / "model.pt"
    torch.jit.trace(loaded.module, torch.zeros(1, 3, 28, 28)).save(str(weights))
    card = json.loads((folder / "model.json").read_text())
    card["weights"] = {"file": "model.pt", "sha256": file_digest(weights, "sha256"),
                       "format": "torchscript"}
    (folder / "model.json").write_text(json.dumps(card))
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path / "out"),
                            "--model", str(folder), "--gradcam"], capsys)
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "TorchScript" in lines[0], err
    assert not (tmp_path / "out" / "CMU-1-Small-Region").exists()


def test_unknown_cam_class_is_one_line(tmp_path: Path, cmu_small: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _default_model()
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path), "--gradcam",
                            "--cam-class", "no-such-class"], capsys)
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no-such-class" in lines[0], err


def test_csv_with_gradcam_column_still_reads(cam_out: Path, tmp_path: Path) -> None:
    """``histotile export qupath`` (and --qupath-merge) read a CSV with the extra column."""
    from histotile.export.csv import read_predictions_csv
    from histotile.export.qupath import export_qupath

    folder = tmp_path / "CMU-1-Small-Region"
    shutil.copytree(cam_out, folder)
    preds = read_predictions_csv(folder / "predictions.csv")
    run = json.loads((folder / "run.json").read_text())
    assert preds.probs.shape == (run["patches"], len(run["model"]["card"]["classes"]))
    assert list(np.unique(preds.labels)) == sorted({r["label"] for r in
                                                   read_csv(folder / "predictions.csv")})
    tiles, merged = export_qupath(folder, merge=True)
    with gzip.open(tiles, "rt") as fh:
        assert len(json.load(fh)["features"]) == run["patches"]
    assert merged.name == "classes.geojson.gz" and merged.stat().st_size > 0
