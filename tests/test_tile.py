"""Patch reads (region-sliced == direct read + resize) and the PCam-layout archive of `tile`."""

from __future__ import annotations

import logging
import pickle

import h5py
import numpy as np
import pytest
import tifffile
from helpers import HE_TARGET, real_data
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
from histotile.tiling import tile_slide


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
        "CMU-1-Small-Region.h5", "CMU-1-Small-Region.tissue.geojson",
        "CMU-1-Small-Region.tissue.png"]  # no temp files left
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

    bad = tmp_path / "generated-corrupt.svs"  # generated: a cut copy of the real SVS
    bad.write_bytes(cmu_small.read_bytes()[:5000])
    summary = histotile.tile([bad, cmu_small], tmp_path / "o", limit=3, progress=False)
    assert [r.status for r in summary.results] == ["failed", "done"]
    assert summary.exit_code == 1 and "generated-corrupt.svs" in summary.failed[0].error
    assert (tmp_path / "o" / "CMU-1-Small-Region.h5").exists()
    summary = histotile.tile(cmu_small, tmp_path / "o2", patch_size=28, mpp=0.5, limit=3,
                             progress=False)
    assert [r.patches for r in summary.results] == [3] and summary.exit_code == 0


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
    target = real_data(HE_TARGET)
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


# ------------------------------------------------------------------ tile through the runner

def _copies(folder, names, cmu_small):
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(cmu_small, folder / name)
    return folder


def test_issue17_7_two_concurrent_tile_runs_into_one_folder(cmu_small, tmp_path):
    """Two `tile` runs into one folder shared the temp name .<name>.h5.tmp: both exited 1 and
    the folder was left empty."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = _copies(tmp_path / "in", [f"s{i}.svs" for i in range(3)], cmu_small)
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "histotile", "-q", "tile", str(folder), "-o", str(out),
           "--limit", "30"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert set(codes) <= {0, 75} and 0 in codes, errs  # 75: left a slide to the other run
    for i in range(3):
        with h5py.File(out / f"s{i}.h5") as f:
            assert f["x"].shape == (30, 96, 96, 3)
        assert (out / f"s{i}.tissue.png").exists() and (out / f"s{i}.run.json").exists()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert list((out / ".locks").iterdir()) == []


def test_issue16_tile_same_name_in_two_folders_writes_two_archives(cmu_small, tmp_path):
    """`tile a/s.svs b/s.svs` wrote s.h5 twice (the second replaced the first)."""
    import histotile

    a = _copies(tmp_path / "a", ["s.svs"], cmu_small) / "s.svs"
    b = _copies(tmp_path / "b", ["s.svs"], cmu_small) / "s.svs"
    summary = histotile.tile([b, a], tmp_path / "out", limit=2, progress=False)
    assert [r.output for r in summary.results] == [str(tmp_path / "out" / "s-2.h5"),
                                                   str(tmp_path / "out" / "s.h5")]
    with h5py.File(tmp_path / "out" / "s.h5") as f:
        assert f.attrs["source_path"] == str(a.resolve())
    with h5py.File(tmp_path / "out" / "s-2.h5") as f:
        assert f.attrs["source_path"] == str(b.resolve())


def test_issue16_tile_and_predict_name_outputs_alike(tmp_path):
    """tile named x.ome.tiff 'x.ome' and a DICOM level file 'level-0...' where predict said
    'x' and the series folder: both now use histotile.items."""
    import shutil

    import histotile
    from histotile.batch import run_batch

    boxes = real_data("slides/boxes-synthetic.tiff")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(boxes, src / "x.ome.tiff")
    series = tmp_path / "series-9"
    shutil.copytree(real_data("slides/CMU-1-Small-Region-dicom"), series)
    level0 = sorted(series.glob("level-0*.dcm"))[0]
    summary = histotile.tile([src / "x.ome.tiff", level0], tmp_path / "t", level=0,
                             patch_size=16, min_tissue=0.0, limit=2, progress=False)
    assert summary.exit_code == 0, summary.table()
    assert sorted(p.name for p in (tmp_path / "t").glob("*.h5")) == ["series-9.h5", "x.h5"]
    runner = run_batch([src / "x.ome.tiff", level0], tmp_path / "p", lambda i, t: {}, {},
                       progress=False)
    assert [r.output for r in runner.results] == [str(tmp_path / "p" / "x"),
                                                  str(tmp_path / "p" / "series-9")]


def test_issue16_tile_dash_o_file_writes_that_archive(cmu_small, tmp_path):
    """`tile s.svs -o out.h5` made a folder named out.h5."""
    from click.testing import CliRunner

    from histotile.cli import cli

    target = tmp_path / "res" / "my-patches.h5"
    res = CliRunner().invoke(cli, ["-q", "tile", str(cmu_small), "-o", str(target),
                                   "--limit", "4"])
    assert res.exit_code == 0, res.output
    assert target.is_file() and (tmp_path / "res" / "my-patches.tissue.png").is_file()
    with h5py.File(target) as f:
        assert f["x"].shape == (4, 96, 96, 3)
    folder = _copies(tmp_path / "in", ["a.svs", "b.svs"], cmu_small)
    two = CliRunner().invoke(cli, ["-q", "tile", str(folder), "-o", str(tmp_path / "x.h5")])
    assert two.exit_code != 0 and "names one archive but 2 slides" in str(two.exception)
    assert not (tmp_path / "x.h5").exists()


def test_tile_resumes_skips_and_recomputes_on_new_options(cmu_small, tmp_path):
    import json

    import histotile

    out = tmp_path / "out"
    first = histotile.tile(cmu_small, out, limit=5, progress=False)
    mtime = (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns
    again = histotile.tile(cmu_small, out, limit=5, progress=False)
    assert [r.status for r in first.results] == ["done"]
    assert [r.status for r in again.results] == ["skipped"] and again.results[0].patches == 5
    assert (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns == mtime
    changed = histotile.tile(cmu_small, out, limit=7, progress=False)
    assert [r.status for r in changed.results] == ["done"]
    run = json.loads((out / "CMU-1-Small-Region.run.json").read_text())
    assert run["fingerprint"]["limit"] == 7 and run["patches"] == 7
    assert sorted(run["files"]) == ["CMU-1-Small-Region.h5", "CMU-1-Small-Region.tissue.geojson",
                                    "CMU-1-Small-Region.tissue.png"]
    with pytest.raises(Exception, match="--mpp"):
        histotile.tile(cmu_small, out, mpp=float("nan"))


def test_tile_cli_takes_its_shard_from_a_slurm_array_task(cmu_small, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from histotile.cli import cli

    folder = _copies(tmp_path / "in", ["a.svs", "b.svs"], cmu_small)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    res = CliRunner().invoke(cli, ["-q", "tile", str(folder), "-o", str(tmp_path / "o"),
                                   "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.h5")) == ["b.h5"]
    assert (tmp_path / "o" / "manifest-1-of-2.csv").exists()


def test_issue17_5_tile_cli_ends_busy_with_exit_75_and_a_line(cmu_small, tmp_path, capsys):
    """A slide held by another run (a live lock on another node) is not success."""
    import json
    import time

    from histotile.cli import main

    folder = _copies(tmp_path / "in", ["a.svs", "b.svs"], cmu_small)
    out = tmp_path / "out"
    (out / ".locks").mkdir(parents=True)
    (out / ".locks" / "b.lock").write_text(json.dumps({"host": "node-7", "pid": 99,
                                                       "time": time.time()}))  # GENERATED
    with pytest.raises(SystemExit) as info:
        main(["tile", str(folder), "-o", str(out), "--limit", "2"])
    err = capsys.readouterr().err
    assert info.value.code == 75
    assert "1 of 2 items are being computed by another run" in err and "node-7" in err
    assert (out / "a.h5").exists() and not (out / "b.h5").exists()
