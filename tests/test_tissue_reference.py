"""New tissue detection and grid against figures of the implementation they replace.

The reference figures below were computed ONCE by the earlier implementation (histotile commit
08756fe: scipy ``median_filter``, ``binary_closing`` and ``label``, scikit-image
``threshold_otsu`` and ``morphology.disk``, an int64 cumsum integral image in the grid) on the
real sample slide and on pyramids generated from it here; they are stored, not recomputed, so
the test compares the OpenCV/LUT implementation with what the old one gave.

Tolerance: >= 99.9 % of mask pixels agree, the tissue pixel count within 0.1 %, the threshold
within one grey level (1/255 in saturation) and the kept patches differ by at most 2 (of 165).
The implementations are equal by construction (the new one gives 100 % and the same patches on
all four cases); the slack is for the thumbnail's pixels, which come from JPEG decoding, and a
different libjpeg build may move a few pixels that sit on the threshold.

Also checked directly, on seeded random inputs: each vectorised step against the scipy /
scikit-image function it replaced, and the grid's tissue fractions against a per-box loop.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from damaged_tiff import write_pyramid

from histotile import tissue as tissue_mod
from histotile.grid import make_grid, tissue_fractions
from histotile.slide import Slide, open_slide
from histotile.tissue import detect_tissue, read_mask_thumbnail

PATCH, MPP, MIN_TISSUE = 96, 0.972, 0.5  # the bench model's grid (what predict lays)


@dataclass(frozen=True)
class Reference:
    shape: tuple[int, int]
    downsample: float
    method: str
    illumination: str
    threshold: float
    tissue_px: int
    grid_shape: tuple[int, int]  # (cols, rows) of the whole grid
    kept_patches: int
    kept: str  # hex of np.packbits of the (rows, cols) kept-patch map, row-major
    mask: tuple[str, ...] | str  # base64 of zlib of np.packbits of the mask, row-major

    def mask_array(self) -> np.ndarray:
        text = "".join(self.mask) if isinstance(self.mask, tuple) else self.mask
        bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8))
        return bits[:self.shape[0] * self.shape[1]].reshape(self.shape).astype(bool)

    def kept_array(self) -> np.ndarray:
        cols, rows = self.grid_shape
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(self.kept), np.uint8))
        return bits[:rows * cols].reshape(rows, cols).astype(bool)


# (slide, requested method) -> figures of the old implementation (module docstring).
# "cmu": tests/data/slides/CMU-1-Small-Region.svs; "pyramid": its level-0 pixels written by
# damaged_tiff.write_pyramid (3 levels halved, zlib, 256 px tiles, mpp 0.5); "dark-pyramid":
# the same with the pixels inverted (255 - rgb: a dark-field picture, masked as otsu-bright).
REFERENCE: dict[tuple[str, str], Reference] = {
    ("cmu", "otsu"): Reference(
        shape=(186, 139), downsample=16.0, method="otsu",
        illumination="brightfield", threshold=0.178431, tissue_px=8503,
        grid_shape=(11, 15), kept_patches=56,
        kept="0000c0100300780f01c0320681e03e07e0fc3f87e0",
        mask=(
            "eNq9lTFyFTEMhrXjGZzObSp8kzhHSknnHU5FaU4AN8DQ0JqhceFYeHfDPun3LBkoeKWfPunXL9lL9H9/Bg+WgicR"
            "D3yGg9AwguHAcX7UZbi/Rea7Lm2YIU1k1qUtM5QezKq1MVdkICRiiONPEMIFQxr6wslq/b5SgIbW5QnSktVqO9ET"
            "GEdvJrNXSEv3OqSQUSF2pH2ne07kdUgjWzFEu+CfH30BKw3rqXIJWc+j26bHzImTTlJ9BUan3ZmsV6PqpRtDtUrt"
            "YH5wgbnHDgwrKX47qLCCegnjdpCRaa8zBZk+MRm1NWRkh5Yh7cKYNmCHB1Oxzh8ZmhiHDKG2Qy26/7eMmZjJffe6"
            "kzvzQVyZnflGd8q4n5VMkia0hyExS/nj/9Alk/PIlSRzP+oXybwfSapsOe+3U7Tc9rdEv3ly++M+DDEQtw8jVGB8"
            "B8bxqhkjbFl2RrodNsY3fS+VEtqZmNTEMsknwWzDMA2f7LjqiakvyCalKGZbQcVsTmYP16NavB7EsHA5ANNchTof"
            "OzAt4u5/qdM1nBYu4cI1XFL+jAwjw+UO6jSDzFr0BeL8AEx1STNdmHvU+XrTe2jrtyU9XhGpLrwcZM2IHk8mIVP1"
            "yyPSnkzW8kXak1l1y+KV+M10sEmkjZjWodpTSkX5Z2U7pWVM67FDO7lyXWdiCjJ9qpOQacic8gPKdyhlmepETOIx"
            "iZ36YewnXDLXYj16MDHLxESs45ExE8NYx6MHNyZhnYpG8qQtowcN++HJg4RS6iSFrlr+F2uXqzXODO/Xi5BfZoEj"
            "IA=="
        )),
    ("cmu", "otsu-gray"): Reference(
        shape=(186, 139), downsample=16.0, method="otsu-gray",
        illumination="brightfield", threshold=192.5, tissue_px=9308,
        grid_shape=(11, 15), kept_patches=63,
        kept="0000c01003c0780f01d03e0781e03f07e0fc3f87e0",
        mask=(
            "eNq9lEFy1TAQRCW80FLcQDeJjsJRLE7AkRAnyBW0z0YUGxWoNDjfP7a6BydhAdlFNW+mp6f9jfm/fws/2MovKz9I"
            "wf8/rp2aBkmESMtYIvIVS6JI5RIhJUKjvchA9RuTuS2qc6pEuMTLI5ZYqVQSulkTluSl4eRmYsLJiUq2jX1CtcY0"
            "lFKwxD5vXLEkm4Btm1kKlhgz+IYRS4bxnUosurBpiZ3cdnjpVeoK4j6JBJgcRL5B2+0eLTa6B7bdmAzhuDGDmC/Q"
            "dmN+SaO7Y6BuDwUZjMJyK0kYQWT8O5nKc0QxlbUNxRTeZ2D2sUsUGrQzs0/7Q1PMqf/D/vCUcGUpnbpUz05OIby7"
            "34jJD8Q0l8mVz42djOS+uEpMWYlpU8nOmDWjcckPNGGLfwX5beuF8jfNBZjqzizcmGGncOwrTx/IbeUaOsl3QvJ/"
            "TIcPfLKdmZOw8g33lacm9uLuXWWFMzmHJ3CTRcV2ZcYzYxUTmXF//jy6+jwSM4WZpuaon4j8GnPx6b6DScz8tIWs"
            "rQ98Zdfpyt/PPvuDnHG6M8LMpPeejNMXz4x9YRL9IpwrOdVWuG3ktk61fXlQ8oeSn5lpzIhiKq88eOVD7bHyYPnH"
            "ZKcmKyZcMvXfMIWZzsxhdmT5ntu+4kG68m15e3DgfRY1R9gDxbhLsceclZnA2pa/YIZiMjOdTRGlrbCRnfc5pCjG"
            "M2Ovb3ppk7bWM2PfjqSF7PwG2jmKjw=="
        )),
    ("pyramid", "otsu"): Reference(
        shape=(186, 139), downsample=15.997304582210242, method="otsu",
        illumination="brightfield", threshold=0.178431, tissue_px=8556,
        grid_shape=(11, 15), kept_patches=56,
        kept="0000c0100300780f01c0320681e03e07e0fc3f87e0",
        mask=(
            "eNq9lEFuFTEMhjONRHaEZXdzkw5H4gCVEjZsOQJXyQ04AtmxDbsIRfnJzLz2xb95VSsksrT82b8d28b833enLIUN"
            "gQ1rJsPWyOBBBgdiFnRPUfFTprYAhQmgMA5oFBZIUhtQmUEUFrCLx3d2KezSuC9ITupfq3mgguKSKax5R2qN+SSl"
            "ZOmybN2YLMMm815GqcaKLrjBPEqXZFZRom3GVXaRXfBIa6UfstIFKCFLQ9+Ti/9I4ovGf1QZdmcgR2MwWSaucujG"
            "HzohZTC/UGicAoiRA7XuhkaMHMLAjP87E5kpnKcrJrO2xswc1oHCLuCwG4d1yuUwzP+hmLvDULnkrjoZWW2hrXsr"
            "89ruv9zJcMqPkvlt7mXjurFxbkIf2q5xdvlfh73PTE7Hel6Z9mHkLzPzZdRZ55LzR7OVueR23BJ58yyE/LQfl1n+"
            "iBgqMVunO+kRJbNMbVkOJhS5l7OSYy+Hn/yx4yrM8keeIro/+tj5ZIcof8z4LMe22EZjK5i9k9nTelTL62FAA5c3"
            "YpqvlOczMzUkGtJv9aU1tGo9Art4djkZKKbcU55+nckLEwutbn4gpvokmT416swzHeBTW7uO03lF8AN0ESCXQZyn"
            "CzPdkSemMgOSP4VdOax9conMFGa6YrIseXLxrPZZfmX5uMkYxSgpTkkBV6jyOFUhOOzKUpwKC27cxlI8M4vKEzjI"
            "ykHekrjw//SbzMqMuyn2mQmsbWXG3mYKM10xiZnKjYTSlrkHjeuB6sG/yH/Fd3hmFsV4taiXTGdT/gBjPyqm"
        )),
    ("dark-pyramid", "otsu"): Reference(
        shape=(186, 139), downsample=15.997304582210242, method="otsu-bright",
        illumination="darkfield", threshold=62.5, tissue_px=9588,
        grid_shape=(11, 15), kept_patches=63,
        kept="0000c01003c0780f01d03e0781e03f07e0fc3f87e0",
        mask=(
            "eNpll02u3CAQhP0neXb2CeI5Seyb5Chws2cpF0HKMouQHVIsOhjcUN3jzTwxVPdHdeHR6zr1vPXCpBc6qxdWvTB8"
            "aI7nc+SF1/PZe/6DvzEaxTiJsu6XRBk3shKFKJwCZSb6kiiGyAuUtIUkStriBMpCFAXKmDSncGUnugTKXLewK1S3"
            "HLXss+VB6emiIFA26oxFlJ7OOYgBJVd2iygz2TEgSp9OvFhEMenEAVG2dOIFUcb7xB5RlsT6TQwosY4OUZZUNoqs"
            "fLlud5iVMXbzJbKSvi8uHLWKK5OuWSEa86RbVsgbjygb0RYRJS38KmWrKxT2gCjJ/TmXHZrGlXAcdcxxj4iSNH9y"
            "2Tag9ARAuedeAjU1zRMoC5oLUMa8xYoBsQayQpfICmt61KArm0YpfTygUN2yosaLG8SNDmict7xq9p8qvdCcDaUs"
            "hIayt7IW2Oi3rSg/inFXRSmd/YKxvV25Q/gS7ofmSiH5rlwJ46lcsaG5UpzcGkp2n0ZfUYrG7eK9ksrOvqIUTWdO"
            "Rin45xwrSjbB39dzAvwrX08cUL6eOCA/p104oNjf4TjwyHtDKTYtV3Wl4P+k5oohjumE+BT0gGLLiqkzHITG6awE"
            "nZX4kRWrs+JaVrZaRKJ0GuXsFEroNEqnUU6NgjeI6q0TKFajOPEbxI0HfQ0flLk2ZpSm6T80b+hzAoqpmgdlaWwr"
            "aP71rqIUm/z3ilL6UIvtY+1fqihlge5f4zdq7t4TajKvxWTcvqyYDKqXuWeNZZS9lX1hMugDhSrK3spOUmMZhRc8"
            "ozB+ZJSKfzKK0SiLRhmh7FtoIqMsQGvFkSOj7K3zIPEDo4DmJfCJ3yuoeWvNpDUFBTWr0BC7sgH+ITQXo1Azu5fn"
            "YZQFyk7SAx6QgYmt2rdBeH1xbKFxQdlgHL3QRL5BBjyYtCajzKhZEba+4gxqDiwSn8tcG999eqEJDwqaklGaxj0o"
            "Bo+8Cs2D0gvNgeZfHyhWoziNcj0o4sgZZccjr9qmQVubURbUSBT+X4BwC+nn+g/wgap4"
        )),}

AGREEMENT = 0.999
PX_COUNT = 0.001
MAX_PATCH_DIFF = 2


@pytest.fixture(scope="module")
def slides(cmu_small, tmp_path_factory) -> dict[str, Path]:
    """The reference slides: the CMU sample and the two pyramids generated from its pixels."""
    import openslide

    folder = tmp_path_factory.mktemp("reference-pyramids")
    with openslide.OpenSlide(str(cmu_small)) as svs:
        rgb = np.asarray(svs.read_region((0, 0), 0, svs.dimensions).convert("RGB"))
    return {"cmu": cmu_small,
            "pyramid": write_pyramid(folder / "generated-cmu-pyramid.tif", rgb, levels=3,
                                     compression="zlib"),
            "dark-pyramid": write_pyramid(folder / "generated-cmu-dark.tif", 255 - rgb,
                                          levels=3, compression="zlib")}


@pytest.mark.parametrize("key", list(REFERENCE), ids=["-".join(k) for k in REFERENCE])
def test_issue19_tissue_mask_and_grid_match_the_old_implementation(slides, key):
    ref = REFERENCE[key]
    with open_slide(slides[key[0]]) as slide:
        found = detect_tissue(slide, method=key[1])
        grid = make_grid(slide, PATCH, target_mpp=MPP, tissue=found, min_tissue=MIN_TISSUE)
    assert found.mask.shape == ref.shape
    assert found.downsample == pytest.approx(ref.downsample, rel=1e-9)
    assert found.method == ref.method and found.illumination.kind == ref.illumination
    step = 1 / 255 if ref.method == "otsu" else 1.0
    assert abs(found.threshold - ref.threshold) <= step + 1e-6
    old = ref.mask_array()
    assert old.sum() == ref.tissue_px  # the stored mask decodes to what was recorded
    agreement = float((found.mask == old).mean())
    assert agreement >= AGREEMENT, f"{agreement:.4%} of mask pixels agree"
    assert abs(int(found.mask.sum()) - ref.tissue_px) <= PX_COUNT * old.size
    kept = np.zeros(ref.grid_shape[::-1], bool)
    kept[grid.indices[:, 1], grid.indices[:, 0]] = True
    assert grid.grid_shape == ref.grid_shape
    assert int((kept != ref.kept_array()).sum()) <= MAX_PATCH_DIFF
    assert abs(len(grid) - ref.kept_patches) <= MAX_PATCH_DIFF


def test_tissue_reference_tolerance_is_not_vacuous():
    """The stored masks are far apart from each other and from trivial masks, so the
    agreement bar says something: a different method or a one-pixel shift fails it."""
    a = REFERENCE[("cmu", "otsu")].mask_array()
    b = REFERENCE[("cmu", "otsu-gray")].mask_array()
    assert 0.2 < a.mean() < 0.5
    for other in (b, np.roll(a, 1, axis=1), np.zeros_like(a), np.ones_like(a)):
        assert float((a == other).mean()) < AGREEMENT


def test_issue19_mask_thumbnail_is_read_from_the_pyramid_level_not_level0(slides, monkeypatch):
    """On a pyramid the thumbnail comes from the coarsest level not coarser than the mask
    resolution (here level 2, ~4x at 0.5 um/px for 8 um/px), never from level 0."""
    levels: list[int] = []
    original = Slide.read_region

    def spy(self, location, level, size):
        levels.append(level)
        return original(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", spy)
    with open_slide(slides["pyramid"]) as slide:
        thumb, ds, mpp = read_mask_thumbnail(slide, tissue_mod.MASK_MPP, [])
        assert slide.level_count == 3
        assert ds == pytest.approx(4 * slide.level_downsamples[2])
        assert mpp == pytest.approx(ds * slide.require_mpp())
    assert levels and set(levels) == {2}
    assert thumb.shape[:2] == REFERENCE[("pyramid", "otsu")].shape


# --- each vectorised step against the library function it replaced (seeded random inputs) ---

_otsu_u8 = tissue_mod._otsu_u8  # noqa: SLF001 - the vectorised step against what it replaced
_channel_u8 = tissue_mod._channel_u8  # noqa: SLF001 - the vectorised step against what it replaced
_median = tissue_mod._median  # noqa: SLF001 - the vectorised step against what it replaced
_disk = tissue_mod._disk  # noqa: SLF001 - the vectorised step against what it replaced
_closing = tissue_mod._closing  # noqa: SLF001 - the vectorised step against what it replaced
_drop_small = tissue_mod._drop_small  # noqa: SLF001 - the vectorised step against what it replaced
_components = tissue_mod._components  # noqa: SLF001 - the vectorised step against what it replaced


def _blobs(shape: tuple[int, int], seed: int, density: float = 0.5) -> np.ndarray:
    """A random mask with objects and holes of many sizes (smoothed noise thresholded)."""
    from scipy.ndimage import uniform_filter

    noise = np.random.default_rng(seed).random(shape)
    return uniform_filter(noise, size=5) > 1 - density * 0.6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_u8_equals_skimage_threshold_otsu(seed):
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(60 + 40 * seed, 12, 4000),
                             rng.normal(200, 20, 6000)]).clip(0, 255).astype(np.uint8)
    counts = np.bincount(values, minlength=256)
    lo, hi = np.flatnonzero(counts)[[0, -1]]
    expected = threshold_otsu(hist=(counts[lo:hi + 1], np.arange(lo, hi + 1))) + 0.5
    assert _otsu_u8(values.reshape(100, 100)) == expected
    assert _otsu_u8(np.full((5, 5), 7, np.uint8)) == 7.0


@pytest.mark.parametrize("method", ["otsu", "otsu-gray"])
def test_channel_lut_equals_float_formula(method):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 257, 3), dtype=np.uint8)
    rgb[:5] = 0  # black: saturation 0, not a division by zero
    if method == "otsu":
        hi, lo = rgb.max(axis=2), rgb.min(axis=2)
        value = (hi - lo).astype(np.float32) * np.float32(255.0)
        value /= np.maximum(hi, 1).astype(np.float32)
    else:
        value = rgb.sum(axis=2, dtype=np.uint16).astype(np.float32) / np.float32(3.0)
    expected = np.rint(value).astype(np.uint8)
    np.testing.assert_array_equal(_channel_u8(rgb, method, rows=64), expected)


@pytest.mark.parametrize("size", [3, 5, 4])
def test_median_equals_scipy_nearest(size):
    from scipy.ndimage import median_filter

    values = np.random.default_rng(size).integers(0, 256, (61, 47), dtype=np.uint8)
    np.testing.assert_array_equal(_median(values, size),
                                  median_filter(values, size=size, mode="nearest"))


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_closing_equals_scipy_binary_closing_on_edge_padded_mask(radius):
    from scipy.ndimage import binary_closing
    from skimage.morphology import disk

    mask = _blobs((90, 70), seed=radius, density=0.4)
    np.testing.assert_array_equal(_disk(radius), disk(radius))
    padded = np.pad(mask, radius, mode="edge")
    expected = binary_closing(padded, disk(radius).astype(bool))[radius:-radius, radius:-radius]
    np.testing.assert_array_equal(_closing(mask, radius), expected)


@pytest.mark.parametrize("max_size", [0, 5, 40, 400])
def test_drop_small_equals_scipy_label_sizes(max_size):
    from scipy.ndimage import label

    mask = _blobs((120, 100), seed=max_size)
    labels, count = label(mask, np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes > max_size
    keep[0] = False
    expected = keep[labels] if max_size >= 1 else mask
    np.testing.assert_array_equal(_drop_small(mask.copy(), max_size), expected)


def test_components_fall_back_to_int32_labels_past_65534():
    """A checkerboard of isolated pixels: 8-connectivity joins them diagonally, so use
    every third pixel: more components than uint16 labels can hold."""
    mask = np.zeros((900, 900), np.uint8)
    mask[::3, ::3] = 1  # 90,000 single-pixel components
    labels, sizes = _components(mask)
    assert labels.dtype == np.int32 and sizes.size == 90_001
    assert sizes[0] == mask.size - 90_000 and (sizes[1:] == 1).all()
    assert not _drop_small(mask.astype(bool), 1).any()


@pytest.mark.parametrize("downsample", [16.0, 15.997304582210242, 3.7])
def test_tissue_fractions_equal_a_per_box_loop(downsample):
    mask = _blobs((80, 64), seed=7)
    rng = np.random.default_rng(11)
    size = 41.0
    coords = np.stack([rng.integers(-30, int(64 * downsample), 200),
                       rng.integers(-30, int(80 * downsample), 200)], axis=1)
    got = tissue_fractions(mask, downsample, coords, size)
    h, w = mask.shape
    for (x, y), value in zip(coords, got, strict=True):
        x0, y0 = (min(max(int(np.floor(v / downsample)), 0), n) for v, n in ((x, w), (y, h)))
        x1, y1 = (min(max(int(np.ceil((v + size) / downsample)), 0), n)
                  for v, n in ((x, w), (y, h)))
        box = mask[y0:y1, x0:x1]
        assert value == pytest.approx(box.mean() if box.size else 0.0, abs=1e-6)


def test_thumbnail_blocks_start_on_tiles_so_no_tile_is_decoded_twice(cmu_small, monkeypatch):
    """CMU-1-Small-Region.svs has 240 px tiles and one level: the 8 um/px thumbnail averages
    16 x 16 areas of level 0, read in blocks that start on tile corners (960 px, not 1024)."""
    boxes: list[tuple[int, int, int, int]] = []
    original = Slide.read_region

    def spy(self, location, level, size):
        boxes.append((int(location[0]), int(location[1]), int(size[0]), int(size[1])))
        return original(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", spy)
    with open_slide(cmu_small) as slide:
        tile = slide.tile_size(0)
        thumb, ds, _ = read_mask_thumbnail(slide, tissue_mod.MASK_MPP, [])
    assert tile == 240 and ds == 16.0 and thumb.shape[:2] == (186, 139)
    assert boxes and all(x % tile == 0 and y % tile == 0 for x, y, _, _ in boxes)
    assert max(w for _, _, w, _ in boxes) == 960
    covered = sum(w * h for _, _, w, h in boxes)
    assert covered == 139 * 16 * 186 * 16  # every level-0 pixel read once (edges padded)
