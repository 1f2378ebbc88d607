"""Tissue detection on real tiles (names say tissue or not) and on the CMU slide."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SHARED_DATA, TILES, real_data
from PIL import Image

from histotile.export.tissue_picture import tissue_picture
from histotile.slide import open_slide
from histotile.tissue import METHODS, detect_tissue, tissue_mask_rgb

# crops of the CMU slide made by tests/generate.py, plus ../shared/data/tiles when it is there
NAMES = [t.removeprefix("tiles/") for t in TILES] + sorted(
    p.name for p in (SHARED_DATA / "tiles").glob("*.png"))


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(real_data(f"tiles/{name}")).convert("RGB"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES)
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
    pic = tissue_picture(t)
    assert pic.ndim == 3 and pic.shape[2] == 3 and max(pic.shape[:2]) >= 1024
