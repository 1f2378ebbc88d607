"""A tile that cannot be decoded costs the patches it covers and nothing more (issue 17, item 4).

Generated pyramids (tests/damaged_tiff.py: real H&E pixels, tifffile's tiled JPEG) with one
tile broken three ways, read through each pixel path: the direct tifffile tile reader
(``auto``), OpenSlide and tiffslide.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_data
from damaged_tiff import MODES, damage_tile, tile_index, write_pyramid
from helpers import HE_REFERENCE, make_untrained_model
from PIL import Image

from histotile.errors import UnreadableRegionError
from histotile.grid import make_grid
from histotile.patches import (
    iter_patch_batches,
    plan_regions,
    read_patch,
    read_region_patches,
    sample_patches,
)
from histotile.slide import open_slide
from histotile.tissue import detect_tissue

BACKENDS = ("auto", "openslide", "tiffslide")
BAD = (512, 512)  # level-0 pixel inside the damaged level-0 tile (tile 256 px)


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """1000 x 1000 px of real, dense H&E (TIAToolbox's target crop, tiled 3 x 3)."""
    rgb = np.asarray(Image.open(real_data(HE_REFERENCE)).convert("RGB"))
    return np.ascontiguousarray(np.tile(rgb, (3, 3, 1))[:1000, :1000])


def damaged(tmp_path, he, mode, page=0, at=BAD):
    path = write_pyramid(tmp_path / f"generated-damaged-{mode}-p{page}.tif", he)
    damage_tile(path, page, tile_index(path, page, at[0] >> page, at[1] >> page), mode)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_issue17_damaged_tile_is_one_typed_error_and_the_rest_reads(tmp_path, he, mode,
                                                                    backend):
    path = damaged(tmp_path, he, mode)
    with open_slide(path, backend=backend) as s:
        with pytest.raises(UnreadableRegionError) as err:
            s.read_region((256, 256), 0, (512, 512))
        assert err.value.level == 0 and err.value.box_level0 == (256, 256, 512, 512)
        # the same handle still reads everything else (OpenSlide's handle is reopened)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (256, 256))[..., 0].shape,
                                      (256, 256))
        good = s.read_region((0, 0), 0, (512, 256))
        with open_slide(write_pyramid(tmp_path / "clean.tif", he), backend=backend) as ref:
            np.testing.assert_array_equal(good, ref.read_region((0, 0), 0, (512, 256)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_issue17_damaged_tile_costs_only_its_patches(tmp_path, he, mode, backend):
    path = damaged(tmp_path, he, mode)
    with open_slide(path, backend=backend, slide_mpp=0.5) as s:
        grid = make_grid(s, 64, target_mpp=0.5)  # 15 x 15 patches of 64 px, no tissue filter
        lost: list[int] = []
        seen = []
        for idx, batch in iter_patch_batches(s, grid, 50, region_size=512, unreadable=lost):
            seen.append(idx)
            assert len(batch) == len(idx)
        seen = np.concatenate(seen)
        x, y = grid.coords[:, 0], grid.coords[:, 1]
        covers = (x < 768) & (x + 64 > 512) & (y < 768) & (y + 64 > 512)  # tile [512, 768)^2
        assert sorted(lost) == sorted(np.flatnonzero(covers).tolist())
        assert len(lost) == 16 and len(seen) + len(lost) == len(grid)
        assert not set(seen.tolist()) & set(lost)
        # a readable patch right beside the bad tile equals a direct read of it
        near = int(seen[np.argmin(np.abs(x[seen] - 448) + np.abs(y[seen] - 512))])
        region = next(r for r in plan_regions(grid, s, 512) if near in r.idx)
        idx, patches = read_region_patches(s, grid, region, [])
        np.testing.assert_array_equal(patches[list(idx).index(near)], read_patch(s, grid, near))
        with pytest.raises(UnreadableRegionError):  # without a list: the old strict behaviour
            list(iter_patch_batches(s, grid, 50, region_size=512))


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue17_stain_sample_skips_unreadable_patches(tmp_path, he, backend):
    path = damaged(tmp_path, he, "header")
    with open_slide(path, backend=backend, slide_mpp=0.5) as s:
        grid = make_grid(s, 64, target_mpp=0.5)
        lost: list[int] = []
        sample = sample_patches(s, grid, n=len(grid), seed=0, unreadable=lost)
        assert len(lost) == 16 and len(sample) == len(grid) - 16
        assert sample.dtype == np.uint8 and sample.shape[1:] == (64, 64, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_issue17_tissue_detection_survives_a_bad_thumbnail_tile(tmp_path, he, mode, backend):
    path = damaged(tmp_path, he, mode, page=2, at=(0, 0))  # the 250 px level's only tile
    with open_slide(path, backend=backend, slide_mpp=0.5) as s:
        tissue = detect_tissue(s, mask_mpp=2.0)
        assert tissue.unreadable, "the damaged thumbnail piece must be recorded"
        x, y, w, h = tissue.unreadable[0]
        assert (x, y) == (0, 0) and w > 0 and h > 0
        # unreadable thumbnail pieces count as tissue: their patches are tried at level 0
        assert tissue.mask.all()
        grid = make_grid(s, 64, target_mpp=0.5, tissue=tissue)
        assert len(grid) == 15 * 15


def test_issue17_engine_records_unreadable_rows_and_predicts_the_rest(tmp_path, he):
    import torch

    from histotile.engine import EngineStats, run_inference
    from histotile.models.loading import load_model

    path = damaged(tmp_path, he, "garbage")
    loaded = load_model(make_untrained_model(tmp_path / "generated-untrained-64", mpp=0.5,
                                             patch_size=64), "cpu")
    with open_slide(path, slide_mpp=0.5) as s:
        grid = make_grid(s, 64, target_mpp=0.5)
        regions = plan_regions(grid, s, 512)
        spec = s.spec
    for workers in (0, 1):
        stats = EngineStats()
        out = list(run_inference(spec, grid, regions, loaded, torch.device("cpu"),
                                 batch_size=32, workers=workers, stats=stats))
        done = np.concatenate([o[0] for o in out])
        assert len(stats.unreadable) == 16 and len(done) == len(grid) - 16
        assert not set(done.tolist()) & set(stats.unreadable)
        assert stats.to_dict()["unreadable_patches"] == 16


def test_issue17_stain_fit_on_an_all_unreadable_sample_is_a_clean_no_tissue_error():
    """Every sampled patch unreadable: the fit says so (predict then runs without the stain
    step and records why) instead of a torch reshape error."""
    from histotile.errors import NoTissueError
    from histotile.stain import make_normalizer

    with pytest.raises(NoTissueError, match="no patches"):
        make_normalizer("macenko", channels_last=True).fit(np.empty((0, 32, 32, 3), np.uint8))
