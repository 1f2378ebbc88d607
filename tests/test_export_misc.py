"""predictions.csv, overlay.png / tissue.png, the OME-TIFF heatmap and ``histotile export``.

Real CMU-1-Small-Region geometry and thumbnail; probabilities GENERATED (Dirichlet draws).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    CLASSES,
    COLORS,
    cmu_overlay_inputs,
    generated_probs,
    write_heatmap,
    write_result,
)

from histotile.export.csv import PredictionsCSVWriter, read_predictions_csv
from histotile.export.overlay import label_image, write_mask_png, write_overlay
from histotile.stitch import read_coverage, read_heatmap


@pytest.fixture(scope="module")
def cmu(cmu_small):
    return cmu_overlay_inputs(cmu_small)[:3]


def test_csv_is_streamed_atomically_and_reads_back(tmp_path):
    coords = np.array([[0, 0], [224, 0], [448, 224]])
    probs = generated_probs(3)
    path = tmp_path / "predictions.csv"
    with PredictionsCSVWriter(path, CLASSES, 224) as table:
        table.write(coords[:2], probs[:2])
        assert not path.exists() and table.tmp.exists()
        table.write(coords[2:], probs[2:])
    assert path.read_text().splitlines()[0] == \
        "minx,miny,width,height,prob_tumor,prob_stroma,prob_background,label"
    back = read_predictions_csv(path)
    np.testing.assert_array_equal(back.coords, coords)
    assert (back.sizes == 224).all()
    np.testing.assert_allclose(back.probs, probs, rtol=1e-6)
    assert list(back.labels) == [CLASSES[k] for k in probs.argmax(axis=1)]
    with pytest.raises(ValueError):
        with PredictionsCSVWriter(tmp_path / "bad.csv", CLASSES, 224) as table:
            raise ValueError("crash")
    assert not list(tmp_path.glob("bad.csv*"))


def test_overlay_blends_argmax_colours_on_the_real_thumbnail(cmu, tmp_path):
    from PIL import Image

    grid, thumb, downsample = cmu
    labels = generated_probs(len(grid["coords"]), seed=2).argmax(axis=1)
    size = grid["attrs"]["patch_size_level0"]
    mask = thumb.mean(axis=2) < 200
    path = write_overlay(tmp_path / "overlay.png", thumb, downsample, grid["coords"], size,
                         labels, CLASSES, COLORS, tissue_mask=mask, alpha=0.5, min_side=0)
    out = np.asarray(Image.open(path).convert("RGB"))
    h, w = thumb.shape[:2]
    assert out.shape[0] >= h and out.shape[1] > w  # legend panel on the right
    lab = label_image((h, w), downsample, grid["coords"], size, labels)
    assert (lab >= 0).sum() == pytest.approx(len(labels) * (size / downsample) ** 2, rel=0.1)
    for (x, y), k in zip(grid["coords"][:10], labels[:10], strict=True):
        cx, cy = int((x + size / 2) / downsample), int((y + size / 2) / downsample)
        expected = 0.5 * thumb[cy, cx] + 0.5 * np.asarray(COLORS[k])
        if not (out[cy, cx] == 0).all():  # not on the tissue outline
            np.testing.assert_allclose(out[cy, cx], expected, atol=1)
    untouched = (lab < 0) & ~(out[:h, :w] == 0).all(axis=2)
    np.testing.assert_array_equal(out[:h, :w][untouched], thumb[untouched])
    assert (out[:h, :w] == 0).all(axis=2).sum() > 100  # the tissue outline is drawn
    legend = out[:, w:].reshape(-1, 3)
    for color in COLORS:
        assert (legend == color).all(axis=1).any()
    small = write_overlay(tmp_path / "small.png", thumb[::8, ::8], downsample * 8,
                          grid["coords"], size, labels, CLASSES, COLORS, min_side=400)
    assert Image.open(small).size[1] == 400  # a 93 px thumbnail enlarged to stay legible


def test_mask_png_round_trips(tmp_path):
    from PIL import Image

    mask = np.zeros((20, 30), bool)
    mask[5:9, 3:20] = True
    path = write_mask_png(tmp_path / "tissue.png", mask)
    np.testing.assert_array_equal(np.asarray(Image.open(path)) > 0, mask)


def test_ome_tiff_is_valid_pyramidal_and_argmax_coloured(cmu, tmp_path):
    import ome_types
    import tifffile

    from histotile.export.ome_tiff import write_heatmap_ome_tiff

    grid, _, _ = cmu
    probs = generated_probs(len(grid["indices"]), seed=5)
    heat = write_heatmap(tmp_path / "heatmap.ome.zarr", grid, probs)
    path = write_heatmap_ome_tiff(heat, tmp_path / "heatmap.ome.tif")
    ome = ome_types.from_tiff(path)
    pixels = ome.images[0].pixels
    cols, rows = grid["grid_shape"]
    stride_um = grid["attrs"]["stride_level0"] * grid["attrs"]["slide_mpp"]
    assert (pixels.size_x, pixels.size_y, pixels.size_c) == (cols, rows, 3)
    assert pixels.physical_size_x == pytest.approx(stride_um)
    assert pixels.physical_size_y == pytest.approx(stride_um)
    assert pixels.physical_size_x_unit.value == "µm"
    data, _ = read_heatmap(heat)
    cover = read_coverage(heat)
    expected = np.where(cover[..., None], np.asarray(COLORS, np.uint8)[data.argmax(axis=0)], 0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), expected)


def test_ome_tiff_pyramid_follows_the_zarr(tmp_path):
    """A generated 700 x 600 grid: three levels, in SubIFDs."""
    import tifffile

    from histotile.export.ome_tiff import write_heatmap_ome_tiff

    cols, rows = 700, 600
    kept = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2)
    grid = {"indices": kept, "grid_shape": (cols, rows),
            "attrs": {"origin_level0": [0, 0], "stride_level0": 100, "slide_mpp": 0.25}}
    heat = write_heatmap(tmp_path / "h.ome.zarr", grid, generated_probs(len(kept)), batch=50000)
    path = write_heatmap_ome_tiff(heat, tmp_path / "h.ome.tif")
    with tifffile.TiffFile(path) as tif:
        shapes = [level.shape for level in tif.series[0].levels]
        assert shapes == [(600, 700, 3), (300, 350, 3), (150, 175, 3)]
        assert len(tif.pages[0].subifds) == 2


def test_cli_export_qupath_and_ome_tiff(cmu, tmp_path):
    from click.testing import CliRunner

    from histotile.cli import cli

    grid, _, _ = cmu
    out_dir = tmp_path / "histotile-out"
    for name, seed in (("slide-a", 1), ("slide-b", 2)):
        write_result(out_dir / name, grid, generated_probs(len(grid["indices"]), seed=seed))
        (out_dir / name / "tiles.geojson.gz").unlink()
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "qupath", str(out_dir), "--geojson-plain", "--merge"])
    assert res.exit_code == 0, res.output
    for name in ("slide-a", "slide-b"):
        assert (out_dir / name / "tiles.geojson").exists()
        assert (out_dir / name / "classes.geojson").exists()
    res = runner.invoke(cli, ["export", "ome-tiff", str(out_dir / "slide-a")])
    assert res.exit_code == 0, res.output
    assert (out_dir / "slide-a" / "heatmap.ome.tif").exists()


def test_cli_export_error_is_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "histotile", "export", "qupath",
                          str(tmp_path / "nothing")], capture_output=True, text=True)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
