"""Fluorescence / dark-field slides are recognised before tissue detection (issue 17, item 2).

Real data: the fluorescence DAPI NDPI (dark-field), the CMU H&E slide, the H&E images and the
tiles cut from the CMU slide (brightfield, never refused). Generated: dark-field pictures in several
channel colours and an H&E picture framed by black padding.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_data
from helpers import HE_REFERENCE, HE_SOURCE, HE_TARGET, TILES
from PIL import Image

from histotile.errors import NotBrightfieldError
from histotile.slide import open_slide
from histotile.tissue import classify_illumination, detect_tissue, require_brightfield

IMAGES = [HE_SOURCE, HE_TARGET, HE_REFERENCE]


def _rgb(rel: str) -> np.ndarray:
    return np.asarray(Image.open(real_data(rel)).convert("RGB"))


def generated_darkfield(colour: tuple[int, int, int], seed: int = 0,
                        size: int = 400) -> np.ndarray:
    """GENERATED: camera noise on black with bright blobs ("nuclei") in one channel colour."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 8, (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(60):
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [rng.integers(4, 12)]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * r * r))
        img += blob[..., None] * np.asarray(colour, np.float32)[None, None, :]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("colour", [(20, 40, 255), (255, 40, 30), (40, 255, 60),
                                    (200, 200, 200)], ids=["dapi", "tritc", "fitc", "mono"])
def test_issue17_generated_darkfield_is_recognised(colour):
    light = classify_illumination(generated_darkfield(colour))
    assert light.kind == "darkfield" and light.border_gray < 20 and light.vendor is None


def test_generated_he_with_black_padding_is_brightfield():
    he = _rgb(HE_REFERENCE)[:384, :384]
    padded = np.zeros((800, 800, 3), np.uint8)  # a scanner's black fill around the scan
    padded[100:700, 100:700] = 240  # glass
    padded[208:592, 208:592] = he
    assert classify_illumination(padded).kind == "brightfield"


@pytest.mark.parametrize("name", IMAGES)
def test_real_stained_images_are_brightfield(name):
    assert classify_illumination(_rgb(name)).kind == "brightfield"


@pytest.mark.parametrize("name", TILES)
def test_real_tiles_are_brightfield(name):
    assert classify_illumination(_rgb(name)).kind == "brightfield"


def test_issue17_fluorescence_ndpi_is_darkfield_by_pixels_and_metadata():
    with open_slide(real_data("slides/fluorescence-DAPI.ndpi")) as s:
        assert s.fluorescence_channel == "DAPI 2 (387)"  # NDPI tag 65434
        tissue = detect_tissue(s)
        light = tissue.illumination
        assert light.kind == "darkfield" and light.vendor == "DAPI 2 (387)"
        # the pixels alone say so too
        assert classify_illumination(tissue.thumbnail).kind == "darkfield"
        # tissue is bright on black: a real mask, not "tissue fraction 1.0"
        assert tissue.method == "otsu-bright" and 0.02 < tissue.fraction < 0.6
        with pytest.raises(NotBrightfieldError) as err:
            require_brightfield(tissue, str(s.path), "pass --allow-darkfield to run it anyway")
    line = err.value.one_line()
    assert "fluorescence" in line and "DAPI" in line and "--allow-darkfield" in line


def test_cmu_he_slide_is_brightfield(cmu_small):
    with open_slide(cmu_small) as s:
        assert s.fluorescence_channel is None
        tissue = detect_tissue(s)
        assert tissue.illumination.kind == "brightfield" and tissue.method == "otsu"
        require_brightfield(tissue, str(s.path), "")  # does not raise
        d = tissue.illumination.to_dict()
        assert d["kind"] == "brightfield" and "dark-field when" in d["rule"]
