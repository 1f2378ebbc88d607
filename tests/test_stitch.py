"""heatmap.ome.zarr: NGFF validity, pixel <-> level-0 round trip, chunk-wise flushing, pyramid.

Probabilities are GENERATED (Dirichlet draws); the grid geometry comes from the real
CMU-1-Small-Region slide through histotile.grid (as predict builds it).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from helpers import CLASSES, COLORS, cmu_grid, generated_probs, real_data, write_heatmap

from histotile.errors import InvalidArgumentError
from histotile.stitch import (
    HeatmapWriter,
    coarsen_mean,
    heatmap_pixel_to_level0,
    level0_to_heatmap_pixel,
    read_coverage,
    read_heatmap,
)


@pytest.fixture(scope="module")
def cmu_heatmap(cmu_small, tmp_path_factory):
    grid = cmu_grid(cmu_small)
    assert 10 < len(grid["indices"]) < grid["grid_shape"][0] * grid["grid_shape"][1]
    probs = generated_probs(len(grid["indices"]))
    path = write_heatmap(tmp_path_factory.mktemp("hm") / "heatmap.ome.zarr", grid, probs)
    return path, grid, probs


def test_heatmap_validates_as_ngff_04(cmu_heatmap):
    import zarr
    from ome_zarr_models.v04 import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    path, grid, _ = cmu_heatmap
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    image = Image.from_zarr(root)
    ms = image.attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    scale = ms.datasets[0].coordinateTransformations[0].scale
    mpp, stride = grid["attrs"]["slide_mpp"], grid["attrs"]["stride_level0"]
    assert scale == pytest.approx([1.0, stride * mpp, stride * mpp])
    channels = image.attributes.omero.channels
    assert [ch.model_extra["label"] for ch in channels] == CLASSES
    assert [ch.color for ch in channels] == ["".join(f"{v:02X}" for v in c) for c in COLORS]
    label = ImageLabel.from_zarr(root["labels/coverage"])
    assert len(label.attributes.multiscales[0].datasets) == len(ms.datasets)
    assert root["0"].dtype == np.uint8
    assert root.attrs["histotile"]["value_scale"] == 255
    assert not list(path.parent.glob(".*.tmp*"))


def test_pixels_round_trip_to_level0_and_values(cmu_heatmap):
    path, grid, probs = cmu_heatmap
    data, attrs = read_heatmap(path)
    cols, rows = grid["grid_shape"]
    assert data.shape == (len(CLASSES), rows, cols)
    c, r = grid["indices"][:, 0], grid["indices"][:, 1]
    x, y = heatmap_pixel_to_level0(c, r, attrs)
    np.testing.assert_array_equal(np.stack([x, y], 1), grid["coords"])
    back_c, back_r = level0_to_heatmap_pixel(grid["coords"][:, 0] + attrs["stride_level0"] - 1,
                                             grid["coords"][:, 1], attrs)
    np.testing.assert_array_equal(back_c, c)
    np.testing.assert_array_equal(back_r, r)
    np.testing.assert_array_equal(data[:, r, c].T, np.rint(probs * 255) / np.float32(255))
    cover = read_coverage(path)
    assert cover.sum() == len(c) and cover[r, c].all()
    assert (data[:, ~cover] == 0).all()
    w, h = grid["dimensions"]
    size = attrs["patch_size_level0"]
    assert (x + size <= w).all() and (y + size <= h).all()


def test_fractional_stride_round_trips_on_the_real_dicom_pyramid(tmp_path):
    """Level 2 of the CMU DICOM pyramid has downsample 4.002...: stride_level0 is fractional."""
    folder = real_data("slides/CMU-1-Small-Region-dicom")
    grid = cmu_grid(sorted(folder.glob("level-0-*.dcm"))[0], level=2)
    assert not float(grid["attrs"]["stride_level0"]).is_integer()
    path = write_heatmap(tmp_path / "h.ome.zarr", grid, generated_probs(len(grid["indices"])),
                         batch=50)
    data, attrs = read_heatmap(path)
    x, y = heatmap_pixel_to_level0(grid["indices"][:, 0], grid["indices"][:, 1], attrs)
    np.testing.assert_array_equal(np.stack([x, y], 1), grid["coords"])
    c, r = level0_to_heatmap_pixel(grid["coords"][:, 0], grid["coords"][:, 1], attrs)
    np.testing.assert_array_equal(np.stack([c, r], 1), grid["indices"])
    assert read_coverage(path).all()


@pytest.mark.parametrize("cols, chunk", [
    (1100, 128),
    pytest.param(3000, 256, marks=pytest.mark.slow),
])
def test_chunks_flush_as_they_complete_on_a_large_grid(tmp_path, cols, chunk):
    """A generated cols x cols grid written in tile-aligned 33 x 33 blocks (region order)."""
    rows, block = cols, 33
    kept = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2)
    base = np.stack(np.meshgrid(np.arange(block), np.arange(block)), -1).reshape(-1, 2)
    values = np.full((len(base), 2), 0.25, np.float32)
    values[:, 1] = 0.75
    tracemalloc.start()
    writer = HeatmapWriter(tmp_path / "big.ome.zarr", (cols, rows), kept, ["a", "b"],
                           [(0, 0, 0), (255, 255, 255)],
                           {"origin_level0": [0, 0], "stride_level0": 16, "slide_mpp": 0.5},
                           chunk=chunk)
    del kept
    tracemalloc.reset_peak()
    for r0 in range(0, rows, block):
        for c0 in range(0, cols, block):
            idx = base + (c0, r0)
            inside = (idx[:, 0] < cols) & (idx[:, 1] < rows)
            writer.write(idx[inside], values[inside])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    writer.close()
    per_row = math.ceil(cols / chunk)
    # a band of chunks is open at a time: one chunk row (plus the next one a block spills into)
    assert writer.peak_open_chunks <= 2 * per_row
    assert writer.image.chunks_written == per_row * math.ceil(rows / chunk)
    full_level0 = 3 * cols * rows  # 2 channels + coverage, uint8
    assert peak < full_level0 / 2, f"tracemalloc peak {peak / 1e6:.1f} MB while writing"
    data, _ = read_heatmap(tmp_path / "big.ome.zarr", level=2)
    assert np.allclose(data[1], np.rint(0.75 * 255) / 255)


def _reference_coarsen(values: np.ndarray, cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain loop version of the coverage-weighted 2x2 mean."""
    c, h, w = values.shape
    oh, ow = math.ceil(h / 2), math.ceil(w / 2)
    out, cov = np.zeros((c, oh, ow), np.uint8), np.zeros((oh, ow), np.uint8)
    for y in range(oh):
        for x in range(ow):
            m = cover[2 * y:2 * y + 2, 2 * x:2 * x + 2] > 0
            if m.any():
                block = values[:, 2 * y:2 * y + 2, 2 * x:2 * x + 2][:, m]
                out[:, y, x] = np.rint(block.astype(np.float64).mean(axis=1))
                cov[y, x] = 1
    return out, cov


def test_pyramid_levels_are_weighted_means_down_to_256(tmp_path):
    cols, rows = 521, 301  # generated sparse grid, odd sizes
    rng = np.random.default_rng(3)
    all_idx = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2)
    kept = all_idx[rng.random(len(all_idx)) < 0.6]
    probs = generated_probs(len(kept), 3, seed=4)
    grid = {"indices": kept, "grid_shape": (cols, rows),
            "attrs": {"origin_level0": [5, 7], "stride_level0": 20, "slide_mpp": 0.25}}
    path = write_heatmap(tmp_path / "h.ome.zarr", grid, probs, batch=5000)
    import zarr

    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    levels = root.attrs["histotile"]["levels"]
    shapes = [root[str(k)].shape for k in range(levels)]
    assert max(shapes[-1][1:]) <= 256 < max(shapes[-2][1:])
    for k in range(1, levels):
        ref, ref_cov = _reference_coarsen(root[str(k - 1)][:],
                                          root["labels/coverage"][str(k - 1)][0])
        np.testing.assert_array_equal(root[str(k)][:], ref)
        np.testing.assert_array_equal(root["labels/coverage"][str(k)][0], ref_cov)
    ts = root.attrs["multiscales"][0]["datasets"][2]["coordinateTransformations"]
    assert ts[0]["scale"] == pytest.approx([1.0, 20 * 0.25 * 4, 20 * 0.25 * 4])
    assert ts[1]["translation"] == pytest.approx([0.0, 7 * 0.25, 5 * 0.25])


def test_coarsen_mean_ignores_unpredicted_pixels():
    values = np.array([[[100, 0], [200, 50]]], np.uint8)
    cover = np.array([[1, 0], [1, 0]], np.uint8)
    out, cov = coarsen_mean(values, cover, (1, 1))
    assert out[0, 0, 0] == 150 and cov[0, 0] == 1


def test_second_named_image_with_its_own_stride(tmp_path):
    """A finer image (e.g. Grad-CAM, 4 x 4 pixels per patch) in the same store."""
    import zarr
    from ome_zarr_models.v04 import Image

    cols, rows = 6, 5
    kept = np.array([(0, 0), (5, 4), (2, 3)], np.int64)
    attrs = {"origin_level0": [100, 200], "stride_level0": 64, "slide_mpp": 0.5}
    cam = np.random.default_rng(1).random((3, 1, 4, 4)).astype(np.float32)  # generated
    with HeatmapWriter(tmp_path / "h.ome.zarr", (cols, rows), kept, CLASSES, COLORS,
                       attrs) as writer:
        grad = writer.add_image("gradcam", block=4, stride_level0=16, channel_names=["cam"],
                                channel_colors=[(255, 128, 0)])
        writer.write(kept, generated_probs(3))
        grad.write(kept, cam)
    root = zarr.open_group(str(tmp_path / "h.ome.zarr"), mode="r", zarr_format=2)
    Image.from_zarr(root["gradcam"])
    arr = root["gradcam/0"][:]
    assert arr.shape == (1, rows * 4, cols * 4)
    np.testing.assert_array_equal(arr[0, 12:16, 8:12], np.rint(cam[2, 0] * 255))
    scale = root["gradcam"].attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == pytest.approx([1.0, 8.0, 8.0])


def test_failed_write_leaves_no_heatmap(tmp_path):
    kept = np.array([(0, 0)], np.int64)
    path = tmp_path / "h.ome.zarr"
    with pytest.raises(RuntimeError):
        with HeatmapWriter(path, (2, 2), kept, CLASSES, COLORS, {"stride_level0": 10}) as w:
            assert w.tmp.exists() and w.tmp.parent == path.parent
            raise RuntimeError("model crashed")
    assert not path.exists() and not list(tmp_path.glob(".*.tmp*"))
    del w


def test_late_and_repeated_patches_keep_earlier_values(tmp_path):
    """A patch re-sent after its chunk was flushed must not wipe the chunk (generated values)."""
    kept = np.array([(0, 0), (1, 0), (0, 1)], np.int64)
    probs = generated_probs(3)
    path = tmp_path / "h.ome.zarr"
    with HeatmapWriter(path, (2, 2), kept, CLASSES, COLORS, {"stride_level0": 10}) as writer:
        writer.write(kept, probs)  # completes and flushes the only chunk
        writer.write(kept[1:2], probs[1:2])  # repeated late
        writer.write(kept[:1], probs[:1])
        with pytest.raises(InvalidArgumentError, match="outside"):
            writer.write(np.array([(2, 0)]), probs[:1])
    data, _ = read_heatmap(path)
    np.testing.assert_array_equal(data[:, kept[:, 1], kept[:, 0]].T,
                                  np.rint(probs * 255) / np.float32(255))
    assert read_coverage(path).sum() == 3
