"""histotile.grid: level choice, patch sizes, overlap, tissue filter (real slides)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import real_data

from histotile.errors import InvalidArgumentError, MissingMppError
from histotile.grid import make_grid, tissue_fractions
from histotile.slide import level0_to_level, open_slide
from histotile.tissue import detect_tissue


@pytest.fixture(scope="module")
def cmu(cmu_small):
    with open_slide(cmu_small) as s:
        yield s


@pytest.mark.parametrize("patch_size,mpp", [(96, 0.972), (28, 0.5), (224, 0.5), (50, 2.0)])
def test_grid_geometry_on_level0(cmu, patch_size, mpp):
    g = make_grid(cmu, patch_size, target_mpp=mpp)
    slide_mpp = cmu.require_mpp()
    psl = round(patch_size * mpp / slide_mpp)
    assert g.level == 0 and g.patch_size_level == psl == g.patch_size_level0 == g.stride_level0
    assert g.effective_mpp == pytest.approx(psl * slide_mpp / patch_size)
    assert abs(g.effective_mpp - mpp) <= slide_mpp / patch_size  # within half a level pixel
    w, h = cmu.dimensions
    assert g.grid_shape == ((w - psl) // psl + 1, (h - psl) // psl + 1)
    assert len(g) == g.grid_shape[0] * g.grid_shape[1]
    np.testing.assert_array_equal(g.coords, np.asarray(g.origin_level0) + g.indices * psl)
    assert g.coords.dtype == np.int64 and (g.coords + psl <= [w, h]).all()
    attrs = g.to_attrs()
    assert attrs["mpp_source"] == "openslide" and attrs["patch_size_level0"] == psl


def test_overlap_and_explicit_level(cmu):
    g = make_grid(cmu, 96, target_mpp=0.972, overlap=0.5)
    assert g.stride_level == round(g.patch_size_level * 0.5)
    ndpi = open_slide(real_data("slides/fluorescence-DAPI.ndpi"))
    g2 = make_grid(ndpi, 64, level=2)
    assert g2.level == 2 and g2.patch_size_level == 64
    assert g2.effective_mpp == pytest.approx(ndpi.level_mpp(2))
    g3 = make_grid(ndpi, 96, target_mpp=0.972)
    assert g3.level == ndpi.best_level_for_mpp(0.972) and g3.level > 0
    ds = ndpi.level_downsamples[g3.level]
    level_xy = np.array([[level0_to_level(x, ds), level0_to_level(y, ds)] for x, y in g3.coords])
    np.testing.assert_array_equal(level_xy, g3.indices * g3.stride_level)


def test_non_integer_downsample_level(tmp_path):
    boxes = open_slide(real_data("slides/boxes-synthetic.tiff"))
    level = next(i for i, d in enumerate(boxes.level_downsamples) if d != int(d))
    g = make_grid(boxes, 8, level=level)
    ds = boxes.level_downsamples[level]
    for (x, y), (lx, ly) in zip(g.coords, g.level_coords(), strict=True):
        assert (level0_to_level(x, ds), level0_to_level(y, ds)) == (lx, ly)


def test_tissue_filter(cmu):
    tissue = detect_tissue(cmu)
    full = make_grid(cmu, 96, target_mpp=0.972)
    expect = tissue_fractions(tissue.mask, tissue.downsample, full.coords,
                              float(full.patch_size_level0))
    for min_tissue in (0.0, 0.5, 0.9):
        g = make_grid(cmu, 96, target_mpp=0.972, tissue=tissue, min_tissue=min_tissue)
        assert (g.tissue_fraction >= min_tissue).all()
        assert len(g) == int((expect >= min_tissue).sum())
        assert g.to_attrs()["tissue_method"] == "otsu"
    assert 0 < len(make_grid(cmu, 96, 0.972, tissue=tissue, min_tissue=0.5)) < len(full)


def test_tissue_fractions_on_a_generated_mask():
    mask = np.zeros((10, 10), bool)  # generated: left half tissue, 4 level-0 px per mask px
    mask[:, :5] = True
    coords = np.array([[0, 0], [20, 0], [16, 8], [36, 36]], np.int64)
    np.testing.assert_allclose(tissue_fractions(mask, 4.0, coords, 8.0), [1.0, 0.0, 0.5, 0.0])


def test_grid_errors(cmu, tmp_path):
    with pytest.raises(InvalidArgumentError, match="larger than"):
        make_grid(cmu, 4000, level=0)
    with pytest.raises(InvalidArgumentError, match="finer"):
        make_grid(cmu, 96, target_mpp=0.1)
    with pytest.raises(InvalidArgumentError):
        make_grid(cmu, 96, target_mpp=0.972, overlap=1.0)
    import tifffile

    plain = tmp_path / "generated-no-mpp.tif"
    tifffile.imwrite(plain, np.full((300, 300, 3), 230, np.uint8))
    with open_slide(plain) as s:
        with pytest.raises(MissingMppError):
            make_grid(s, 96, target_mpp=0.972)
        assert len(make_grid(s, 96, level=0)) == 9  # --level works without an mpp
