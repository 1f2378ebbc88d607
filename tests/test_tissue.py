"""Tissue detection on real tiles (names say tissue or not) and on the CMU slide."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA, real_data
from PIL import Image

from histotile.slide import open_slide
from histotile.tissue import METHODS, detect_tissue, overlay, tissue_mask_rgb

TILES = ["almost-white-1.png", "almost-white-2.png", "no-tissue.png", "no-tissue2.png",
         "tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png",
         "tissue-level2-1784-6289-5880-10386.png", "tissue-level2-3000-7666-7096-11763.png"]


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(real_data(f"tiles/{name}")).convert("RGB"))


def test_tile_list_matches_the_shared_folder():
    folder = SHARED_DATA / "tiles"
    if not folder.exists():
        pytest.skip("../shared/data/tiles not present")
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(TILES)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TILES)
def test_tiles_by_name(name, method):
    fraction = tissue_mask_rgb(_rgb(name), method=method).mean()
    if name.startswith("tissue-"):
        assert fraction > 0.3, f"{name}: only {fraction:.2f} tissue"
    else:
        assert fraction < 0.05, f"{name}: {fraction:.2f} tissue on an empty tile"


def test_blank_picture_has_no_tissue():
    white = np.full((200, 200, 3), 245, np.uint8)  # generated: plain glass colour
    for method in METHODS:
        assert not tissue_mask_rgb(white, mpp=8.0, method=method).any()


@pytest.mark.parametrize("method", METHODS)
def test_cmu_tissue(cmu_small, method):
    with open_slide(cmu_small) as s:
        t = detect_tissue(s, method=method)
        assert 8.0 * 0.5 <= t.mpp <= 16.0 and t.downsample * s.require_mpp() == pytest.approx(t.mpp)
        assert t.mask.shape == t.thumbnail.shape[:2] and t.mask.dtype == bool
        assert 0.1 < t.fraction < 0.9
        # tissue is darker and more saturated than what is left out
        gray = t.thumbnail.mean(axis=2)
        assert gray[t.mask].mean() < gray[~t.mask].mean() - 20
    pic = overlay(t)
    assert pic.ndim == 3 and pic.shape[2] == 3 and max(pic.shape[:2]) >= 1024
