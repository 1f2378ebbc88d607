"""Patch reads (region-sliced == direct read + resize) and the PCam-layout archive of `tile`."""

from __future__ import annotations

import logging
import pickle

import h5py
import numpy as np
import pytest
import tifffile
from conftest import real_data
from PIL import Image

from histotile.grid import make_grid, tissue_fractions
from histotile.patches import (
    iter_patch_batches,
    plan_regions,
    read_patch,
    read_region_patches,
    resize_patch,
    tile_size,
)
from histotile.slide import open_slide
from histotile.tile import tile_slide


def _direct(slide, grid, i):
    """The reference: one read_region at the patch's level-0 corner, then the resize."""
    x, y = (int(v) for v in grid.coords[i])
    crop = slide.read_region((x, y), grid.level, (grid.patch_size_level,) * 2)
    return resize_patch(crop, grid.patch_size)


def _check_regions(slide, grid, region_size=2048):
    regions = plan_regions(grid, slide, region_size)
    seen = np.concatenate([r.idx for r in regions])
    assert sorted(seen.tolist()) == list(range(len(grid)))  # every patch exactly once
    align = tile_size(slide, grid.level)
    block = max(align, region_size // align * align)
    for region in regions:
        xy = grid.level_coords()[region.idx]
        assert len({(x // block, y // block) for x, y in xy}) == 1  # one tile-aligned block
        idx, patches = read_region_patches(slide, grid, region)
        assert patches.shape == (len(idx), grid.patch_size, grid.patch_size, 3)
        for k in range(len(idx)):
            np.testing.assert_array_equal(patches[k], _direct(slide, grid, int(idx[k])))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_region_patches_equal_direct_reads_cmu(cmu_small, backend):
    with open_slide(cmu_small, backend=backend) as s:
        _check_regions(s, make_grid(s, 96, target_mpp=0.972))  # 187 px -> 96 px (box filter)
        g = make_grid(s, 28, target_mpp=0.5).subset(slice(0, 4000, 23))  # 28 px, sparse
        _check_regions(s, g, region_size=1024)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_region_patches_equal_direct_reads_pyramid(backend):
    with open_slide(real_data("slides/fluorescence-DAPI.ndpi"), backend=backend) as s:
        g = make_grid(s, 96, target_mpp=0.972, overlap=0.25)
        assert g.level > 0
        _check_regions(s, g.subset(slice(0, None, 3)), region_size=512)


def test_worker_reopens_slide_from_spec(cmu_small):
    """What DataLoader workers do: get (spec, grid, region), reopen, read."""
    with open_slide(cmu_small) as s:
        g = make_grid(s, 96, target_mpp=0.972)
        region = plan_regions(g, s)[0]
        spec, grid2, region2 = pickle.loads(pickle.dumps((s.spec, g, region)))
        with open_slide(**spec) as again:
            idx, patches = read_region_patches(again, grid2, region2)
        np.testing.assert_array_equal(patches, read_region_patches(s, g, region)[1])


def test_iter_patch_batches(cmu_small):
    with open_slide(cmu_small) as s:
        g = make_grid(s, 64, target_mpp=0.5)
        batches = list(iter_patch_batches(s, g, batch_size=100, region_size=512))
        sizes = [len(i) for i, _ in batches]
        assert all(n == 100 for n in sizes[:-1]) and 0 < sizes[-1] <= 100
        idx = np.concatenate([i for i, _ in batches])
        assert sorted(idx.tolist()) == list(range(len(g)))
        i, p = batches[3]
        np.testing.assert_array_equal(p[5], read_patch(s, g, int(i[5])))


def test_resize_patch_is_area_average():
    rng = np.random.default_rng(0)  # generated: a random 8x8 patch halved to 4x4
    patch = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expect = patch.reshape(4, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(resize_patch(patch, 4).astype(np.float64) - expect).max() <= 1
    assert resize_patch(patch, 8) is not None and (resize_patch(patch, 8) == patch).all()


def test_pcam_archive_from_cmu(cmu_small, tmp_path):
    """Done-when: 96 px / 0.972 um/px, tissue only, pixels == direct read_region + resize."""
    result = tile_slide(cmu_small, tmp_path, patch_size=96, mpp=0.972, min_tissue=0.5)
    assert result.archive == tmp_path / "CMU-1-Small-Region.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "CMU-1-Small-Region.h5", "CMU-1-Small-Region.tissue.png"]  # no temp files left
    with h5py.File(result.archive) as f:
        x, coords = f["x"], f["coords"][:]
        assert x.dtype == np.uint8 and x.shape == (result.n_patches, 96, 96, 3)
        assert x.chunks == (1, 96, 96, 3)
        assert coords.dtype == np.int64 and coords.shape == (result.n_patches, 2)
        attrs = dict(f.attrs)
        patches = x[:]
    assert result.n_patches > 10
    assert attrs["source_path"] == str(cmu_small.resolve())
    assert attrs["backend"] == "openslide" and attrs["mpp_source"] == "openslide"
    assert attrs["target_mpp"] == 0.972 and attrs["patch_size"] == 96
    assert attrs["min_tissue"] == 0.5 and "histotile_version" in attrs
    with open_slide(cmu_small) as s:
        assert attrs["slide_mpp"] == s.require_mpp()
        psl = round(96 * 0.972 / s.require_mpp())
        assert attrs["patch_size_level0"] == psl
        for k, (xx, yy) in enumerate(coords):
            direct = resize_patch(s.read_region((int(xx), int(yy)), 0, (psl, psl)), 96)
            np.testing.assert_array_equal(patches[k], direct)
        from histotile.tissue import detect_tissue

        t = detect_tissue(s)
    frac = tissue_fractions(t.mask, t.downsample, coords, float(psl))
    assert (frac >= 0.5).all()  # tissue patches only
    full = make_grid(s, 96, target_mpp=0.972)
    all_frac = tissue_fractions(t.mask, t.downsample, full.coords, float(psl))
    assert result.n_patches == int((all_frac >= 0.5).sum())  # and all of them
    png = Image.open(result.tissue_png)
    assert png.mode == "RGB" and max(png.size) >= 1024


def test_28px_limit_and_level(cmu_small, tmp_path):
    r = tile_slide(cmu_small, tmp_path, patch_size=28, mpp=0.5, limit=50)
    with h5py.File(r.archive) as f:
        assert f["x"].shape == (50, 28, 28, 3)
    boxes = real_data("slides/boxes-synthetic.tiff")
    r2 = tile_slide(boxes, tmp_path, patch_size=16, level=1, min_tissue=0.0)
    with h5py.File(r2.archive) as f, open_slide(boxes) as s:
        w, h = s.level_dimensions[1]
        assert f["x"].shape[0] == (w // 16) * (h // 16) and f.attrs["level"] == 1


def test_no_tissue_gives_empty_archive_and_warning(tmp_path, caplog):
    blank = tmp_path / "generated-blank.tif"  # generated: an empty 'glass' slide with a pixel size
    tifffile.imwrite(blank, np.full((1024, 1024, 3), 242, np.uint8), tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with caplog.at_level(logging.WARNING):
        r = tile_slide(blank, tmp_path / "out", patch_size=96, mpp=0.972)
    assert r.n_patches == 0
    assert any("no tissue" in m or "no patch" in m for m in caplog.messages)
    with h5py.File(r.archive) as f:
        assert f["x"].shape == (0, 96, 96, 3) and f["coords"].shape == (0, 2)


def test_library_tile_multi_slide(cmu_small, tmp_path):
    import histotile
    from histotile.errors import HistotileError

    bad = tmp_path / "generated-corrupt.svs"  # generated: a cut copy of the real SVS
    bad.write_bytes(cmu_small.read_bytes()[:5000])
    with pytest.raises(HistotileError, match="1 of 2 slides failed"):
        histotile.tile([bad, cmu_small], tmp_path / "o", limit=3)
    assert (tmp_path / "o" / "CMU-1-Small-Region.h5").exists()
    results = histotile.tile(cmu_small, tmp_path / "o2", patch_size=28, mpp=0.5, limit=3)
    assert [r.n_patches for r in results] == [3]


def test_sample_patches_is_seeded_and_equals_direct_reads(cmu_small):
    from histotile.patches import sample_patches

    with open_slide(cmu_small) as s:
        grid = make_grid(s, 28, target_mpp=0.5)  # dense: many picks share a region read
        a = sample_patches(s, grid, n=64, seed=1)
        assert a.dtype == np.uint8 and a.shape == (64, 28, 28, 3)
        np.testing.assert_array_equal(a, sample_patches(s, grid, n=64, seed=1))
        assert not np.array_equal(a, sample_patches(s, grid, n=64, seed=2))
        pick = np.sort(np.random.default_rng(1).choice(len(grid), size=64, replace=False))
        for k, i in enumerate(pick):
            np.testing.assert_array_equal(a[k], _direct(s, grid, int(i)))
        small = grid.subset(slice(0, 5))
        assert sample_patches(s, small, n=64).shape == (5, 28, 28, 3)  # fewer than n: all
        assert sample_patches(s, grid.subset(slice(0, 0))).shape == (0, 28, 28, 3)


def test_tile_stain_norm_macenko_cmu(cmu_small, tmp_path):
    import json

    import torch
    from click.testing import CliRunner

    from histotile.cli import cli
    from histotile.stain import StainFit, make_normalizer

    raw = tile_slide(cmu_small, tmp_path / "raw", limit=40)
    target = real_data("images/he-target-torchstain.png")
    res = CliRunner().invoke(cli, ["--quiet", "tile", str(cmu_small), "-o", str(tmp_path / "n"),
                                    "--limit", "40", "--stain-norm", "macenko",
                                    "--stain-target", str(target)])
    assert res.exit_code == 0, res.output
    with h5py.File(raw.archive) as f:
        raw_x, raw_coords = f["x"][:], f["coords"][:]
    with h5py.File(tmp_path / "n" / "CMU-1-Small-Region.h5") as f:
        x, coords, attrs = f["x"][:], f["coords"][:], dict(f.attrs)
    np.testing.assert_array_equal(coords, raw_coords)
    assert x.dtype == np.uint8 and x.shape == raw_x.shape
    assert np.abs(x.astype(int) - raw_x).mean() > 5  # the colours changed
    assert attrs["stain_method"] == "macenko"
    assert json.loads(attrs["stain_reference"])["source"] == target.name
    fit_info = json.loads(attrs["stain_fit"])
    assert fit_info["sample_patches"] == 40 and fit_info["seed"] == 0
    fit = StainFit(torch.tensor(fit_info["stain_matrix"], dtype=torch.float32),
                   torch.tensor(fit_info["max_concentrations"], dtype=torch.float32))
    norm = make_normalizer("macenko", target_image=target, channels_last=True)
    expected = norm.normalize(raw_x, fit)
    np.testing.assert_array_equal(x, expected)


def test_tile_stain_norm_on_blank_regions(cmu_small, tmp_path, caplog):
    blank_slide = tmp_path / "generated-blank.tif"  # generated: an empty 'glass' slide
    tifffile.imwrite(blank_slide, np.full((1024, 1024, 3), 242, np.uint8), tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    r0 = tile_slide(blank_slide, tmp_path / "c", stain_norm="macenko")
    assert r0.n_patches == 0 and r0.attrs["stain_method"] == "none"
    # glass patches only (min_tissue 0): the fit has nothing to use -> raw patches, a warning
    with caplog.at_level(logging.WARNING):
        r = tile_slide(blank_slide, tmp_path / "a", min_tissue=0.0, stain_norm="macenko")
    assert r.n_patches > 0
    assert r.attrs["stain_method"] == "none" and r.attrs["stain_requested"] == "macenko"
    assert "stain_fit_error" in r.attrs and any("stain fit failed" in m for m in caplog.messages)
    with h5py.File(r.archive) as f:
        assert f["x"].dtype == np.uint8 and (f["x"][:] == 242).all()
    # a fitted real slide keeps its glass patches finite, uint8 and near-white
    r2 = tile_slide(cmu_small, tmp_path / "b", min_tissue=0.0, limit=150, stain_norm="macenko")
    with h5py.File(r2.archive) as f:
        x, frac = f["x"][:], f["tissue_fraction"][:]
    assert r2.attrs["stain_method"] == "macenko" and x.dtype == np.uint8
    blank = x[frac == 0]
    assert len(blank) > 10 and blank.mean() > 200
